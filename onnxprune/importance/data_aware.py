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

Two criteria need more than channel statistics, and say so with their own
collector (`criterion_statistics(name, model, analysis, data)` runs the right
one; the pipeline calls it):

* ``ablation``: zero-ablation sensitivity of a calibration loss
  (`onnxprune.calibration.ablation`): the increase of the divergence from the
  dense model's outputs (KL of the class scores, relative MSE otherwise) when
  the unit alone is zeroed where its consumers read it, which is what
  removal does. Costs one pass of 64 samples per unit (through the part of
  the model after the unit), under a FLOPs budget. Without autograd in
  onnxruntime a first-order Taylor score is not available; ablation is the
  exact version of what Taylor approximates.
* ``thinet``: ThiNet / He et al. greedy selection by next-layer
  reconstruction error (`onnxprune.calibration.removal_error`): from the
  consumers' (centred) Gram matrices, repeatedly remove the unit whose
  removal increases the summed relative error of the group's consumers the
  least; a unit's score is its rank in that removal order (removed first =
  lowest). Units of several channels (heads) leave with all their channels.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from onnxprune.analysis import Analysis, Group
from onnxprune.errors import CalibrationRequired
from onnxprune.importance.base import CRITERIA, Criterion, Needs, combine, register, unit_index
from onnxprune.importance.criteria import l1_scores


def _channel_statistics(model, analysis, data, *, groups=None, max_samples=None, seed=0, samples=None):
    from onnxprune.calibration import calibration_statistics

    return calibration_statistics(model, analysis, data, groups=groups, max_samples=max_samples, seed=seed)


def _removal_errors(model, analysis, data, *, groups=None, max_samples=None, seed=0, samples=None):
    from onnxprune.calibration.removal_error import removal_errors

    return removal_errors(model, analysis, data, groups=groups, max_samples=max_samples, seed=seed)


def _ablation(model, analysis, data, *, groups=None, max_samples=None, seed=0, samples=None):
    from onnxprune.calibration.ablation import DEFAULT_SAMPLES, ablation_sensitivity

    return ablation_sensitivity(model, analysis, data, groups=groups, max_samples=max_samples, seed=seed,
                                samples=samples or DEFAULT_SAMPLES)


# What each need is measured by, and the attribute that tells its result apart (None: channel statistics).
COLLECTORS = {
    Needs.STATISTICS: (_channel_statistics, None, "channel statistics (calibration.calibration_statistics)"),
    Needs.REMOVAL_ERRORS: (_removal_errors, "matrices", "next-layer removal errors (calibration.removal_errors)"),
    Needs.ABLATION: (_ablation, "scores", "zero-ablation sensitivities (calibration.ablation_sensitivity)"),
}


def criterion_statistics(name: str, model, analysis: Analysis, data, *, groups=None,
                         max_samples: int | None = None, seed: int = 0, ablation_samples: int | None = None):
    """What data-aware criterion `name` reads (pass it as score_groups(..., stats=...)), measured on `model`
    (the model `analysis` was built on) with calibration `data`; None for a data-free criterion.
    ablation_samples: samples per unit for an ablation criterion (default 64; the FLOP budget may lower it)."""
    found = CRITERIA.get(name)
    if found is None or not found.needs_data:
        return None
    collect = COLLECTORS[found.needs][0]
    return collect(model, analysis, data, groups=groups, max_samples=max_samples, seed=seed,
                   samples=ablation_samples)


class DataCriterion(Criterion):
    """A criterion that reads what calibration data measured (`stats`); it refuses to score without it."""

    needs = Needs.STATISTICS

    def require(self, stats) -> None:
        if stats is None:
            raise CalibrationRequired(
                f"criterion '{self.name}' ranks units by what they do on calibration data and needs calibration "
                "statistics: give calibration data (prune --calib DATA), or pass score_groups(..., stats="
                f"onnxprune.importance.data_aware.criterion_statistics('{self.name}', model, analysis, data)); "
                f"data-free criteria: {', '.join(n for n, c in sorted(CRITERIA.items()) if not c.needs_data)}")
        _, attribute, what = COLLECTORS[self.needs]
        if attribute is not None and not hasattr(stats, attribute):
            raise CalibrationRequired(
                f"criterion '{self.name}' reads {what}, not channel statistics: pass score_groups(..., stats="
                f"onnxprune.importance.data_aware.criterion_statistics('{self.name}', model, analysis, data))")


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


def _or_magnitude(scores, analysis, group):
    return scores if scores is not None else l1_scores(analysis, group)


@register
class APoZ(DataCriterion):
    """1 - Average Percentage of Zeros of the unit's activations at its consumers' inputs."""

    name = "apoz"

    def score(self, analysis, group, rng, stats=None):
        self.require(stats)
        return _or_magnitude(sink_aggregate(analysis, group, stats, lambda s, cs: 1.0 - cs.apoz), analysis, group)


@register
class MeanActivation(DataCriterion):
    """Mean |activation| of the unit at its consumers' inputs."""

    name = "mean_act"

    def score(self, analysis, group, rng, stats=None):
        self.require(stats)
        return _or_magnitude(sink_aggregate(analysis, group, stats, lambda s, cs: cs.mean_abs), analysis, group)


class ColumnTimesActivation(DataCriterion):
    """A statistic of each consumer's weight column times one of the unit's activations at that input,
    summed over the unit's input positions of each consumer."""

    def column(self, cols: np.ndarray) -> np.ndarray:
        """One number per input position from the (positions, rows) weight columns."""
        raise NotImplementedError

    def activation(self, cs) -> np.ndarray:
        """One number per input position from its channel statistics."""
        raise NotImplementedError

    def score(self, analysis, group, rng, stats=None):
        self.require(stats)

        def scores(sink, cs):
            weights = column_weights(analysis, sink, self.column)
            return None if weights is None or len(weights) != cs.size else self.activation(cs) * weights

        return _or_magnitude(sink_aggregate(analysis, group, stats, scores, how="sum"), analysis, group)


@register
class FLAP(ColumnTimesActivation):
    """FLAP fluctuation: Var(x_j) x ||W[:, j]||^2."""

    name = "flap"

    def column(self, cols):
        return np.square(cols).sum(axis=1)

    def activation(self, cs):
        return cs.var


@register
class Wanda(ColumnTimesActivation):
    """Structured Wanda: mean over output rows of |W_ij| x ||X_j|| (RMS over calibration samples)."""

    name = "wanda"

    def column(self, cols):
        return np.abs(cols).mean(axis=1)

    def activation(self, cs):
        return cs.rms


@register
class Ablation(DataCriterion):
    """Zero-ablation sensitivity: divergence from the dense outputs when the unit alone is removed."""

    name = "ablation"
    needs = Needs.ABLATION
    same_scale = True  # every score is a divergence of the same outputs: comparable across groups

    def score(self, analysis, group, rng, stats=None):
        self.require(stats)
        return _or_magnitude(stats.scores.get(group.id), analysis, group)


def unit_error_matrix(analysis: Analysis, group: Group, stats) -> np.ndarray | None:
    """Summed channel matrices of the group's measured sinks, per unit (size x size); None if none measured."""
    total = None
    for sink, idx in group_sinks(analysis, group):
        m = stats.matrices.get((sink.tensor, sink.axis, sink.node))
        if m is None or len(m) != len(idx):
            continue
        mine = np.flatnonzero(idx >= 0)
        onehot = np.zeros((len(mine), group.size))
        onehot[np.arange(len(mine)), idx[mine]] = 1.0
        part = onehot.T @ m[np.ix_(mine, mine)] @ onehot
        total = part if total is None else total + part
    return total


def greedy_removal_order(errors: np.ndarray) -> np.ndarray:
    """ThiNet's greedy: unit indices in the order that keeps err(S) = sum_{u,v in S} errors[u, v] smallest
    at each step (ties: lowest index first)."""
    n = len(errors)
    cross = np.zeros(n)  # sum over removed v of errors[u, v] + errors[v, u]
    diag = np.diag(errors).copy()
    left = np.ones(n, dtype=bool)
    order = np.empty(n, dtype=np.int64)
    for step in range(n):
        cost = np.where(left, cross + diag, np.inf)
        u = int(np.argmin(cost))
        order[step] = u
        left[u] = False
        cross += errors[u, :] + errors[:, u]
    return order


@register
class ThiNet(DataCriterion):
    """ThiNet greedy removal order by next-layer reconstruction error; score = rank (removed first = lowest)."""

    name = "thinet"
    needs = Needs.REMOVAL_ERRORS

    def score(self, analysis, group, rng, stats=None):
        self.require(stats)
        errors = unit_error_matrix(analysis, group, stats)
        if errors is None:
            return l1_scores(analysis, group)
        scores = np.empty(group.size)
        scores[greedy_removal_order(errors)] = np.arange(1, group.size + 1, dtype=np.float64)
        return scores

