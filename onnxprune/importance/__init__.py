"""Importance criteria: pick units to remove by score (data-free, and data-aware with calibration stats)."""
from __future__ import annotations

import numpy as np

from onnxprune.analysis import Analysis, Group
from onnxprune.importance import criteria, data_aware  # noqa: F401  (registers the criteria)
from onnxprune.importance.base import CRITERIA


def score_groups(analysis: Analysis, groups: list[Group], name: str, seed: int = 0,
                 stats=None) -> dict[int, np.ndarray]:
    """Unit scores for each group, normalised to mean 1 so groups compare globally.

    stats: what a data-aware criterion reads (apoz, mean_act, flap, wanda, ablation,
    thinet), from onnxprune.importance.data_aware.criterion_statistics(name, model,
    analysis, data); ignored by the others.
    """
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion '{name}'; choose one of {sorted(CRITERIA)}")
    rng = np.random.default_rng(seed)
    out = {}
    for g in groups:
        fn = CRITERIA[name]
        scores = fn(analysis, g, rng, stats=stats) if getattr(fn, "needs_stats", False) else fn(analysis, g, rng)
        if scores is None:
            scores = np.ones(g.size)
        mean = scores.mean()
        out[g.id] = scores / mean if mean > 0 else scores
    return out


__all__ = ["CRITERIA", "score_groups"]
