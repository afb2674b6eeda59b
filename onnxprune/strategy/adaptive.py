"""Adaptive allocation: per-group ratios that reach the target with the least predicted divergence.

Each group's sensitivity curve (onnxprune.calibration.curves) predicts the
divergence of the final outputs when it loses k units; removing a unit of a
group saves `a_g` FLOPs (or parameters, or one unit for a plain ratio) when
it goes alone. For a price λ, every group independently keeps the count that
minimises  loss_g(k) − λ·a_g·k  over its allowed counts (multiples of
--round-to, within --max-ratio); a higher price removes more everywhere, so
λ is bisected until the real cost estimate (onnxprune.strategy.estimate,
which includes the interactions between neighbouring groups) reaches the
target. Coarse rounding can make the last λ step overshoot: the plan then
starts from the last configuration below the target and adds single
rounding steps, each where it costs the least predicted loss per FLOP.

Groups without a curve (nothing of theirs reaches a consumer that matters)
are left whole.

The curves measure each group alone, before any repair, so their sum can
misjudge a whole plan. The pipeline therefore rewrites and repairs this
allocation and the uniform one of the same target, and keeps the one whose
outputs are closer to the dense model's on the held-out calibration samples
(`pipeline.stages.rewrite_candidates`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxprune.analysis import Analysis, Group
from onnxprune.analysis.diagnose import explain
from onnxprune.errors import PlanError
from onnxprune.strategy.allocate import OVERSHOOT_TOLERANCE, Target, eligible_groups, removed_flags, unit_rounding
from onnxprune.strategy.estimate import CostEstimator


@dataclass
class GroupChoice:
    group: int
    name: str
    size: int
    kept: int
    predicted_loss: float

    def to_dict(self) -> dict:
        return {"group": self.group, "name": self.name, "size": self.size, "kept": self.kept,
                "ratio": round(1 - self.kept / self.size, 4), "predicted_loss": round(self.predicted_loss, 8)}


@dataclass
class AdaptiveAllocation:
    keep: dict[int, np.ndarray]
    choices: list[GroupChoice] = field(default_factory=list)
    removed: float = 0.0  # of the target's measure (FLOPs, parameters or units)

    @property
    def predicted_loss(self) -> float:
        return sum(c.predicted_loss for c in self.choices)

    def note(self, what: str) -> str:
        ratios = sorted(1 - c.kept / c.size for c in self.choices)
        spread = f"{ratios[0]:.0%}–{ratios[-1]:.0%}" if ratios else "none"
        return (f"adaptive allocation: {self.removed:.1%} of {what} removed; per-group ratios {spread} from "
                f"sensitivity curves (predicted divergence {self.predicted_loss:.4g}, the sum over groups)")


def allowed_kept(group: Group, round_to: int, max_ratio: float) -> np.ndarray:
    """Kept counts a group may end with: its size, or a multiple of the rounding below it, within max_ratio."""
    step = unit_rounding(group, round_to)
    floor = max(1, group.size - int(np.floor(group.size * max_ratio)))
    multiples = np.arange((group.size - 1) // step * step, 0, -step) if step > 1 else np.arange(group.size - 1, 0, -1)
    return np.concatenate([[group.size], multiples[multiples >= floor]]).astype(np.int64)


def allocate_adaptive(analysis: Analysis, scores: dict[int, np.ndarray], curves, target: Target,
                      estimator: CostEstimator | None) -> AdaptiveAllocation:
    """group id -> sorted unit indices to keep for every eligible group with a curve, meeting `target`
    (ratio: of all their units; target_flops / target_params: of the model's)."""
    groups = [g for g in eligible_groups(analysis, target.include, target.exclude) if g.id in curves.curves]
    if not groups:
        raise PlanError("adaptive allocation: no prunable group has a sensitivity curve" + explain(analysis))
    measure = _Measure(analysis, groups, target, estimator)
    options = {g.id: allowed_kept(g, target.round_to, target.max_ratio) for g in groups}
    loss = {g.id: np.array([curves.curves[g.id].loss_at(g.size - k) for k in options[g.id]]) for g in groups}
    saved = {g.id: measure.per_unit[g.id] * (g.size - options[g.id]) for g in groups}

    def choose(price: float) -> dict[int, int]:
        out = {}
        for g in groups:
            objective = loss[g.id] - price * saved[g.id]
            out[g.id] = int(options[g.id][int(np.argmin(objective))])  # ties: the first, i.e. the most kept
        return out

    hi = _price_cap(loss, saved)
    if measure.removed(choose(hi)) < measure.goal:
        best = measure.removed(choose(hi))
        raise PlanError(f"cannot remove {measure.goal:.1%} of {measure.what}: at most {best:.1%} is removable with "
                        f"max_ratio={target.max_ratio} over {len(groups)} groups with sensitivity curves (raise "
                        "--max-ratio, relax --include/--exclude, or lower the target)")
    lo = 0.0  # the price is bisected: halved from the cap until below the goal, then geometrically
    for _ in range(100):
        mid = hi / 2 if lo == 0.0 else float(np.sqrt(lo * hi))
        if measure.removed(choose(mid)) >= measure.goal:
            hi = mid
        else:
            lo = mid
        if lo > 0.0 and hi / lo < 1.0 + 1e-9:
            break
    counts = choose(hi)
    if measure.removed(counts) > measure.goal + OVERSHOOT_TOLERANCE:
        counts = _top_up(groups, choose(lo), options, loss, measure)
    keep = _keep_indices(groups, scores, counts)
    choices = [GroupChoice(g.id, g.name, g.size, counts[g.id],
                           float(loss[g.id][int(np.flatnonzero(options[g.id] == counts[g.id])[0])])) for g in groups]
    return AdaptiveAllocation(keep, choices, measure.removed(counts))


def _price_cap(loss: dict, saved: dict) -> float:
    """A price at which every group removes all it may: above every loss per unit of cost."""
    ratios = [float(np.max(l[1:] / np.maximum(s[1:], 1e-30))) for l, s in zip(loss.values(), saved.values())
              if len(l) > 1]
    return 2.0 * max(ratios + [1e-12]) + 1.0


def _top_up(groups, counts: dict[int, int], options: dict, loss: dict, measure: "_Measure") -> dict[int, int]:
    """From `counts` (below the goal), single rounding steps where predicted loss per removed cost is least.
    The last step is the one that lands within the overshoot tolerance with the least loss; while none
    does, a step that stays below the goal; else the one that overshoots least."""
    counts = dict(counts)
    current = measure.removed(counts)
    tolerance = measure.goal + OVERSHOOT_TOLERANCE
    while current < measure.goal:
        landing = below = over = None
        for g in groups:
            where = int(np.flatnonzero(options[g.id] == counts[g.id])[0])
            if where + 1 >= len(options[g.id]):
                continue
            trial = {**counts, g.id: int(options[g.id][where + 1])}
            gained = measure.removed(trial) - current
            if gained <= 0:
                continue
            extra = float(loss[g.id][where + 1] - loss[g.id][where])
            step = (g.id, trial[g.id], gained)
            if current + gained > tolerance:
                if over is None or gained < over[0][2]:
                    over = (step, gained)
            elif current + gained >= measure.goal:
                if landing is None or extra < landing[1]:
                    landing = (step, extra)
            elif below is None or extra / gained < below[1]:
                below = (step, extra / gained)
        chosen = landing or below or over
        if chosen is None:
            break
        gid, kept, gained = chosen[0]
        counts[gid] = kept
        current += gained
    return counts


def _keep_indices(groups, scores, counts) -> dict[int, np.ndarray]:
    return {g.id: np.sort(np.argsort(-scores[g.id], kind="stable")[:counts[g.id]]) for g in groups}


class _Measure:
    """What the target counts (FLOPs, parameters, or units of the eligible groups) and how much of it a
    configuration of kept counts removes; `per_unit[g]` is what one unit of g saves when it goes alone."""

    def __init__(self, analysis: Analysis, groups: list[Group], target: Target, estimator: CostEstimator | None):
        self.analysis, self.groups = analysis, groups
        self.kind = "flops" if target.target_flops is not None else "params" if target.target_params is not None \
            else "units"
        self.goal = {"flops": target.target_flops, "params": target.target_params, "units": target.ratio}[self.kind]
        self.what = {"flops": "FLOPs", "params": "parameters", "units": "the eligible units"}[self.kind]
        self.estimator = estimator
        if self.kind != "units":
            if estimator is None:
                raise PlanError("FLOP and parameter targets need a cost estimator")
            self.dense = estimator.dense_flops if self.kind == "flops" else estimator.dense_params
            if self.dense <= 0:
                raise PlanError("the model's FLOPs could not be computed (shapes unknown); fix the dynamic input "
                                "dimensions with --input-shape")
        self.total_units = sum(g.size for g in groups)
        self.per_unit = {g.id: self._alone(g) for g in groups}

    def _alone(self, g: Group) -> float:
        if self.kind == "units":
            return 1.0 / self.total_units
        return self.estimator.saving_per_unit(g)[0 if self.kind == "flops" else 1]

    def removed(self, counts: dict[int, int]) -> float:
        """Fraction of the measure removed when each group in `counts` keeps that many (its first units:
        which ones does not change the cost)."""
        if self.kind == "units":
            return sum(g.size - counts.get(g.id, g.size) for g in self.groups) / self.total_units
        keep = {gid: np.arange(k) for gid, k in counts.items()}
        flops, params = self.estimator.estimate(removed_flags(self.analysis, keep))
        return 1.0 - (flops if self.kind == "flops" else params) / self.dense
