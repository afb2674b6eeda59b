"""Data-free criteria: magnitude (L1, L2), BN scale, FPGM, random."""
from __future__ import annotations

import numpy as np

from onnxprune.importance.base import Criterion, aggregate, other_axes, per_position, register, slices_with_roles

WEIGHTS = {"weight_out", "weight_in"}


def l1_scores(analysis, group) -> np.ndarray | None:
    """Sum of |w| over every weight slice of the unit (its filters and the next layer's columns)."""
    return aggregate(analysis, group, slices_with_roles(group, WEIGHTS),
                     lambda v, axis: np.abs(v).sum(axis=other_axes(v, axis), dtype=np.float64))


@register
class L1(Criterion):
    """Magnitude: sum of |w| over the unit's filters and the next layer's columns."""

    name = "l1"

    def score(self, analysis, group, rng, stats=None):
        return l1_scores(analysis, group)


@register
class L2(Criterion):
    """Magnitude: Euclidean norm of the unit's weights, per slice."""

    name = "l2"

    def score(self, analysis, group, rng, stats=None):
        return aggregate(analysis, group, slices_with_roles(group, WEIGHTS),
                         lambda v, axis: np.sqrt(np.square(v).sum(axis=other_axes(v, axis), dtype=np.float64)))


@register
class BatchNormScale(Criterion):
    """|gamma| of the BatchNorm/InstanceNorm slices (network slimming); L1 when the group has none."""

    name = "bn_scale"

    def score(self, analysis, group, rng, stats=None):
        slices = slices_with_roles(group, {"bn_scale"})
        if not slices:
            return l1_scores(analysis, group)
        return aggregate(analysis, group, slices, lambda v, axis: np.abs(np.asarray(v, dtype=np.float64)))


@register
class FPGM(Criterion):
    """Redundancy: a filter close to the geometric median of its layer is replaceable (He et al. 2019).

    Score = sum of distances to the other filters of the same weight; small = redundant.
    """

    name = "fpgm"

    def score(self, analysis, group, rng, stats=None):
        def distance_sums(v, axis):
            rows = per_position(v, axis, lambda m: m)
            sq = (rows * rows).sum(axis=1)
            d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * rows @ rows.T, 0.0)
            return np.sqrt(d2).sum(axis=1)

        slices = slices_with_roles(group, {"weight_out"}) or slices_with_roles(group, WEIGHTS)
        return aggregate(analysis, group, slices, distance_sums)


@register
class Random(Criterion):
    """Baseline: uniform random scores (seeded)."""

    name = "random"

    def score(self, analysis, group, rng, stats=None):
        return rng.random(group.size)
