"""Importance criteria (data-free for now): pick units to remove by score."""
from __future__ import annotations

import numpy as np

from onnxprune.analysis import Analysis, Group
from onnxprune.importance import criteria  # noqa: F401  (registers the criteria)
from onnxprune.importance.base import CRITERIA


def score_groups(analysis: Analysis, groups: list[Group], name: str, seed: int = 0) -> dict[int, np.ndarray]:
    """Unit scores for each group, normalised to mean 1 so groups compare globally."""
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion '{name}'; choose one of {sorted(CRITERIA)}")
    rng = np.random.default_rng(seed)
    out = {}
    for g in groups:
        scores = CRITERIA[name](analysis, g, rng)
        if scores is None:
            scores = np.ones(g.size)
        mean = scores.mean()
        out[g.id] = scores / mean if mean > 0 else scores
    return out


__all__ = ["CRITERIA", "score_groups"]
