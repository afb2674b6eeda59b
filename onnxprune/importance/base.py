"""Importance criteria: one score per unit of a group (higher = more important).

A criterion reads the group's parameter slices.  Per-slice scores are
normalised by their mean so a 3x3 conv and a 1x1 conv weigh the same, then
averaged over every slice that touches the unit: a unit is judged by all the
parameters that go with it, not only its producing layer (DepGraph's lesson).
"""
from __future__ import annotations

import enum
from typing import Callable, ClassVar

import numpy as np

from onnxprune.analysis import Analysis, Group, ParamSlice
from onnxprune.analysis.units import NO_UNIT


class Needs(enum.Enum):
    """What a criterion reads besides the weights; the pipeline measures it on calibration data first."""

    NOTHING = "data-free"                # weights only
    STATISTICS = "statistics"            # per-channel activation statistics at the sinks (one pass)
    REMOVAL_ERRORS = "removal errors"    # the consumers' channel Gram matrices (one pass)
    ABLATION = "ablation"                # the model run again with each unit removed (a pass per unit)


class Criterion:
    """A way to rank the units of a group: one score per unit, higher = more important.

    Subclasses set `name` and `needs`, and implement `score`; `same_scale` says the scores of
    different groups share one scale (divergences of the same outputs) and compare as they are.
    """

    name: ClassVar[str]
    needs: ClassVar[Needs] = Needs.NOTHING
    same_scale: ClassVar[bool] = False

    @property
    def needs_data(self) -> bool:
        return self.needs is not Needs.NOTHING

    def score(self, analysis: Analysis, group: Group, rng: np.random.Generator,
              stats=None) -> np.ndarray | None:
        """Scores of the group's units (None: no opinion, the units score alike)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<criterion {self.name} ({self.needs.value})>"


CRITERIA: dict[str, Criterion] = {}


def register(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: registers one instance of the criterion under its name; a name is taken once."""
    if cls.name in CRITERIA:
        raise RuntimeError(f"criterion '{cls.name}' is already registered ({type(CRITERIA[cls.name]).__name__})")
    CRITERIA[cls.name] = cls()
    return cls


def unit_index(analysis: Analysis, group: Group, p: ParamSlice) -> np.ndarray:
    """For each position of the slice's axis: the group's unit index, or -1."""
    layout = np.asarray(analysis.layouts[p.tensor][p.axis], dtype=np.int64)
    roots = np.asarray(group.roots, dtype=np.int64)
    out = np.full(len(layout), -1, dtype=np.int64)
    if not len(roots):
        return out
    owned = layout != NO_UNIT
    found = analysis.root_of[layout[owned]]
    sorter = np.argsort(roots, kind="stable")
    at = np.minimum(np.searchsorted(roots, found, sorter=sorter), len(roots) - 1)
    index = sorter[at]
    out[owned] = np.where(roots[index] == found, index, -1)
    return out


def other_axes(values: np.ndarray, axis: int) -> tuple[int, ...]:
    return tuple(a for a in range(values.ndim) if a != axis)


def per_position(values: np.ndarray, axis: int, reduce: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Collapse every axis but `axis`: one number per position."""
    moved = np.moveaxis(values.astype(np.float32, copy=False), axis, 0).reshape(values.shape[axis], -1)
    return np.asarray(reduce(moved), dtype=np.float64)


def combine(size: int, members, how: str = "sum") -> np.ndarray | None:
    """Per-unit scores from several members, each an (unit index per position, score per position) pair.

    Within a member, positions of a unit are summed (or averaged with how="mean");
    each member is normalised by its mean over the units it touches, then members
    are averaged per unit.  None when no member touches any unit.
    """
    total = np.zeros(size)
    count = np.zeros(size)
    for idx, scores in members:
        mine = idx >= 0
        if not mine.any():
            continue
        # bincount adds each unit's positions in order, as np.add.at did
        per_unit = np.bincount(idx[mine], weights=np.asarray(scores, dtype=np.float64)[mine], minlength=size)
        hits = np.bincount(idx[mine], minlength=size).astype(np.float64)
        touched = hits > 0
        if how == "mean":
            per_unit[touched] /= hits[touched]
        mean = per_unit[touched].mean()
        if mean > 0:
            per_unit /= mean
        total += per_unit
        count += touched
    if not count.any():
        return None
    return np.where(count > 0, total / np.maximum(count, 1), 0.0)


def aggregate(analysis: Analysis, group: Group, slices: list[ParamSlice], position_scores) -> np.ndarray | None:
    """Sum position scores into units per slice, normalise each slice, average."""
    def members():
        for p in slices:
            values = analysis.view.weight(p.tensor)  # a quantized weight's real values
            if values is not None:
                yield unit_index(analysis, group, p), position_scores(values, p.axis)

    return combine(group.size, members())


def slices_with_roles(group: Group, roles: set[str]) -> list[ParamSlice]:
    return [p for p in group.params if p.role in roles]
