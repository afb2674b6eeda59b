"""Importance criteria: pick units to remove by score (data-free, and data-aware with calibration stats)."""
from __future__ import annotations

import numpy as np

from onnxprune.errors import UsageError
from onnxprune.analysis import Analysis, Group
from onnxprune.importance import criteria, data_aware  # noqa: F401  (registers the criteria)
from onnxprune.importance.base import CRITERIA


def score_groups(analysis: Analysis, groups: list[Group], name: str, seed: int = 0,
                 stats=None) -> dict[int, np.ndarray]:
    """Unit scores for each group, normalised to mean 1 per group so groups compare globally by
    relative importance; a criterion whose scores share one scale across groups (`same_scale`: ablation,
    the divergence of the model's outputs) is divided by one mean over all groups instead, so the global
    strategy removes the units the model misses least wherever they are.

    stats: what a data-aware criterion reads (apoz, mean_act, flap, wanda, ablation,
    thinet), from onnxprune.importance.data_aware.criterion_statistics(name, model,
    analysis, data); ignored by the others.
    """
    if name not in CRITERIA:
        raise UsageError(f"unknown criterion '{name}'; choose one of {sorted(CRITERIA)}")
    rng = np.random.default_rng(seed)
    fn = CRITERIA[name]
    raw = {}
    for g in groups:
        scores = fn(analysis, g, rng, stats=stats) if getattr(fn, "needs_stats", False) else fn(analysis, g, rng)
        raw[g.id] = np.ones(g.size) if scores is None else np.asarray(scores, dtype=np.float64)
    if getattr(fn, "same_scale", False) and raw:
        mean = float(np.concatenate(list(raw.values())).mean())
        return {gid: s / mean if mean > 0 else s for gid, s in raw.items()}
    return {gid: s / s.mean() if s.mean() > 0 else s for gid, s in raw.items()}


__all__ = ["CRITERIA", "score_groups"]
