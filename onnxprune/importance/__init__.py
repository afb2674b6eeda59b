"""Importance criteria: pick units to remove by score (data-free, and data-aware with calibration stats)."""
from __future__ import annotations

import numpy as np

from onnxprune.errors import UsageError
from onnxprune.analysis import Analysis, Group
from onnxprune.importance import criteria, data_aware  # noqa: F401  (registers the criteria)
from onnxprune.importance.base import CRITERIA, Criterion, Needs


def criterion(name: str) -> Criterion:
    """The registered criterion called `name`; a UsageError listing the choices for an unknown name."""
    if name not in CRITERIA:
        raise UsageError(f"unknown criterion '{name}'; choose one of {sorted(CRITERIA)}")
    return CRITERIA[name]


def score_groups(analysis: Analysis, groups: list[Group], name: str, seed: int = 0,
                 stats=None) -> dict[int, np.ndarray]:
    """Unit scores for each group, normalised to mean 1 per group so groups compare globally by
    relative importance; a criterion whose scores share one scale across groups (`Criterion.same_scale`: ablation,
    the divergence of the model's outputs) is divided by one mean over all groups instead, so the global
    strategy removes the units the model misses least wherever they are.

    stats: what a criterion that needs data reads (`CRITERIA[name].needs`), from
    onnxprune.importance.data_aware.criterion_statistics(name, model, analysis, data);
    ignored by the data-free ones.
    """
    chosen = criterion(name)
    rng = np.random.default_rng(seed)
    raw = {}
    for g in groups:
        scores = chosen.score(analysis, g, rng, stats=stats)
        raw[g.id] = np.ones(g.size) if scores is None else np.asarray(scores, dtype=np.float64)
    if chosen.same_scale and raw:
        mean = float(np.concatenate(list(raw.values())).mean())
        return {gid: s / mean if mean > 0 else s for gid, s in raw.items()}
    return {gid: s / s.mean() if s.mean() > 0 else s for gid, s in raw.items()}


__all__ = ["CRITERIA", "Criterion", "Needs", "criterion", "score_groups"]
