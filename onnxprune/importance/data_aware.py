"""Data-aware criteria: rank units by what they do on calibration data.

They read activation statistics at the group's *sinks* (the inputs of the
Conv/Gemm/MatMul nodes that consume the units), collected on the dense model
by `onnxprune.calibration.calibration_statistics(model, analysis, data)`, and
receive them as `stats` (score_groups(..., stats=...)). Without statistics
they raise `CalibrationRequired`.

* ``apoz``: 1 - APoZ (Hu et al. 2016): a channel that is zero after its ReLU
  most of the time contributes little.
* ``mean_act``: mean |activation| of the channel.
* ``flap``: fluctuation (An et al. 2024, FLAP): variance of the input
  channel x squared norm of the consumer's weight column; a channel whose
  input hardly varies is replaced by its mean (which bias compensation adds back).
* ``wanda``: structured Wanda (Sun et al. 2023): mean over output rows of
  |W_ij| x ||X_j|| (||X_j|| as the RMS over samples and positions).

Per sink, position scores are summed (flap, wanda) or averaged (apoz,
mean_act) into units, normalised by their mean over the group's units there,
then averaged over the group's sinks (as `aggregate` does for weights). A
group with no measured sink falls back to L1 magnitude.

Still to come: first-order Taylor / zero-ablation sensitivity of a
calibration loss (divergence from the dense outputs) and ThiNet/He-style
greedy selection by next-layer reconstruction error.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from onnxprune.analysis import Analysis, Group
from onnxprune.errors import DataError
from onnxprune.importance.base import CRITERIA, combine, criterion, unit_index
from onnxprune.importance.criteria import l1


class CalibrationRequired(DataError):
    """A data-aware criterion was asked for without calibration statistics."""


def data_criterion(name: str):
    """Register a criterion that needs calibration statistics (`stats=`)."""

    def wrap(fn):
        fn.needs_stats = True
        return criterion(name)(fn)

    return wrap


def needs_statistics(name: str) -> bool:
    """Whether criterion `name` needs calibration statistics (the pipeline collects them only then)."""
    return bool(getattr(CRITERIA.get(name), "needs_stats", False))


def _require(name: str, stats) -> None:
    if stats is None:
        raise CalibrationRequired(
            f"criterion '{name}' ranks units by their activations and needs calibration statistics: give "
            "calibration data (prune --calib DATA), or pass score_groups(..., stats="
            "onnxprune.calibration.calibration_statistics(model, analysis, data)); data-free criteria: "
            "l1, l2, bn_scale, fpgm, random")


def group_sinks(analysis: Analysis, group: Group):
    """The sinks (activation axes consumed by mixing ops) that carry units of `group`, with their unit index."""
    out = []
    seen = set()
    for s in analysis.state.sinks:
        key = (s.tensor, s.axis, s.node)
        if key in seen:
            continue
        seen.add(key)
        idx = unit_index(analysis, group, s)
        if (idx >= 0).any():
            out.append((s, idx))
    return out


def column_weights(analysis: Analysis, sink, reduce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray | None:
    """reduce(W[:, j]) for every input position j of the sink's consumer, or None when unknown.

    reduce maps a (positions, rows) matrix to one value per position.
    """
    node = next((n for n in analysis.view.nodes if n.name == sink.node), None)
    if node is None or len(node.input) < 2:
        return None
    if node.op_type == "Conv":
        w = analysis.view.const_input(node, 1)
        if w is None:
            return None
        group = int(analysis.view.attr(node, "group", 1))
        o, cg = w.shape[0], w.shape[1]
        cols = w.reshape(group, o // group, cg, -1).transpose(0, 2, 1, 3).reshape(group * cg, -1)
        return reduce(cols.astype(np.float64))
    if node.op_type == "Gemm":
        w = analysis.view.const_input(node, 1)
        if w is None or w.ndim != 2:
            return None
        cols = w if int(analysis.view.attr(node, "transB", 0)) else w.T  # (N, K) -> columns are K
        return reduce(cols.T.astype(np.float64))
    if node.op_type == "MatMul":
        b = analysis.view.const_input(node, 1)
        if b is not None and sink.tensor == node.input[0]:
            cols = np.moveaxis(b, -2, 0).reshape(b.shape[-2], -1)  # (K, rest)
            return reduce(cols.astype(np.float64))
        a = analysis.view.const_input(node, 0)
        if a is not None and sink.tensor == node.input[1]:
            cols = np.moveaxis(a, -1, 0).reshape(a.shape[-1], -1)
            return reduce(cols.astype(np.float64))
    return None


def sink_aggregate(analysis: Analysis, group: Group, stats, position_scores, how: str = "mean") -> np.ndarray | None:
    """Combine per-position scores at every sink of the group into one score per unit.

    position_scores(sink, channel_stats) -> array (one per position along the sink axis) or None.
    """
    def members():
        for sink, idx in group_sinks(analysis, group):
            cs = stats.get(sink.tensor, sink.axis)
            scores = None if cs is None else position_scores(sink, cs)
            if scores is not None and len(scores) == len(idx):
                yield idx, scores

    return combine(group.size, members(), how)


def _or_magnitude(scores, analysis, group, rng):
    return scores if scores is not None else l1(analysis, group, rng)


@data_criterion("apoz")
def apoz(analysis, group, rng, stats=None):
    """1 - Average Percentage of Zeros of the unit's activations at its consumers' inputs."""
    _require("apoz", stats)
    return _or_magnitude(sink_aggregate(analysis, group, stats, lambda s, cs: 1.0 - cs.apoz), analysis, group, rng)


@data_criterion("mean_act")
def mean_act(analysis, group, rng, stats=None):
    """Mean |activation| of the unit at its consumers' inputs."""
    _require("mean_act", stats)
    return _or_magnitude(sink_aggregate(analysis, group, stats, lambda s, cs: cs.mean_abs), analysis, group, rng)


@data_criterion("flap")
def flap(analysis, group, rng, stats=None):
    """FLAP fluctuation: Var(x_j) x ||W[:, j]||^2 summed over the unit's input positions of each consumer."""
    _require("flap", stats)

    def scores(sink, cs):
        energy = column_weights(analysis, sink, lambda cols: np.square(cols).sum(axis=1))
        return None if energy is None or len(energy) != cs.size else cs.var * energy

    return _or_magnitude(sink_aggregate(analysis, group, stats, scores, how="sum"), analysis, group, rng)


@data_criterion("wanda")
def wanda(analysis, group, rng, stats=None):
    """Structured Wanda: mean over output rows of |W_ij| x ||X_j|| (RMS over calibration samples)."""
    _require("wanda", stats)

    def scores(sink, cs):
        mean_abs = column_weights(analysis, sink, lambda cols: np.abs(cols).mean(axis=1))
        return None if mean_abs is None or len(mean_abs) != cs.size else mean_abs * cs.rms

    return _or_magnitude(sink_aggregate(analysis, group, stats, scores, how="sum"), analysis, group, rng)


DATA_AWARE = ("apoz", "mean_act", "flap", "wanda")
