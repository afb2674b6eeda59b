"""Data-free criteria: magnitude (L1, L2), BN scale, FPGM, random."""
from __future__ import annotations

import numpy as np

from onnxprune.importance.base import aggregate, criterion, other_axes, per_position, slices_with_roles

WEIGHTS = {"weight_out", "weight_in"}


@criterion("l1")
def l1(analysis, group, rng):
    """Sum of |w| over every weight slice of the unit (its filters and the next layer's columns)."""
    return aggregate(analysis, group, slices_with_roles(group, WEIGHTS),
                     lambda v, axis: np.abs(v).sum(axis=other_axes(v, axis), dtype=np.float64))


@criterion("l2")
def l2(analysis, group, rng):
    return aggregate(analysis, group, slices_with_roles(group, WEIGHTS),
                     lambda v, axis: np.sqrt(np.square(v).sum(axis=other_axes(v, axis), dtype=np.float64)))


@criterion("bn_scale")
def bn_scale(analysis, group, rng):
    """|gamma| of the BatchNorm/InstanceNorm slices (network slimming); L1 when the group has none."""
    slices = slices_with_roles(group, {"bn_scale"})
    if not slices:
        return l1(analysis, group, rng)
    return aggregate(analysis, group, slices, lambda v, axis: np.abs(np.asarray(v, dtype=np.float64)))


@criterion("fpgm")
def fpgm(analysis, group, rng):
    """Redundancy: a filter close to the geometric median of its layer is replaceable (He et al. 2019).

    Score = sum of distances to the other filters of the same weight; small = redundant.
    """
    def distance_sums(v, axis):
        rows = per_position(v, axis, lambda m: m)
        sq = (rows * rows).sum(axis=1)
        d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * rows @ rows.T, 0.0)
        return np.sqrt(d2).sum(axis=1)

    slices = slices_with_roles(group, {"weight_out"}) or slices_with_roles(group, WEIGHTS)
    return aggregate(analysis, group, slices, distance_sums)


@criterion("random")
def random(analysis, group, rng):
    """Baseline: uniform random scores (seeded)."""
    return rng.random(group.size)
