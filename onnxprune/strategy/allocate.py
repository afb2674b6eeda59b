"""Turn a target into a plan: how many units each group keeps, and which.

Every number is a fraction REMOVED:
* ratio          - of the units of each eligible group (uniform), or of all
                   eligible units ranked together (global); uniform ratios may
                   differ by what the units are: {"heads": 0.25, "neurons": 0.3}
                   (groups of a kind not named keep every unit);
* target_flops   - of the whole model's FLOPs;
* target_params  - of the whole model's parameters.
FLOP and parameter targets search the ratio that reaches them with the fast
estimator.  Kept channel counts are rounded up to multiples of `round_to`, and no
group loses more than `max_ratio` of its units.  Where that rounding makes the
searched ratio overshoot the target by more than 2 points of the model (narrow
layers move in steps of a quarter or a half), the plan starts just below the
target instead and adds single rounding steps, each to the group whose next
units cost the least score per FLOP (or parameter) they remove; groups then
differ by a step or so from the uniform ratio.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import numpy as np

from onnxprune.analysis import Analysis, Group
from onnxprune.analysis.diagnose import explain, headline
from onnxprune.errors import PlanError, UsageError
from onnxprune.options import DepthOptions, TargetOptions
from onnxprune.strategy.estimate import CostEstimator


KINDS = ("channels", "neurons", "heads", "kv-groups", "hidden")


def kind_key(group: Group) -> str:
    return group.kind.replace(" ", "-")


@dataclass
class Target:
    ratio: float | dict[str, float] | None = None
    target_flops: float | None = None
    target_params: float | None = None
    strategy: str = "uniform"  # or "global"
    max_ratio: float = 0.9
    round_to: int = 8
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)

    def check(self) -> None:
        """The option checks (onnxprune.options.TargetOptions.check), for a target built without them."""
        TargetOptions(ratio=self.ratio, target_flops=self.target_flops, target_params=self.target_params,
                      strategy=self.strategy, max_ratio=self.max_ratio, round_to=self.round_to,
                      include=tuple(self.include), exclude=tuple(self.exclude)).check(DepthOptions())


def eligible_groups(analysis: Analysis, include: list[str], exclude: list[str]) -> list[Group]:
    """Prunable groups filtered by node-name glob or op type of their sources, or by
    what their units are: kind:channels, kind:neurons, kind:heads, kind:kv-groups."""

    def matches(g: Group, patterns: list[str]) -> bool:
        kind = "kind:" + g.kind.replace(" ", "-")
        return any(p == kind or fnmatch.fnmatchcase(s.node, p) or s.op_type == p for s in g.sources for p in patterns)

    prunable = analysis.prunable_groups()
    out = [g for g in prunable if not (include and not matches(g, include)) and not (exclude and matches(g, exclude))]
    if prunable and not out and (include or exclude):
        filters = " ".join([f"--include '{p}'" for p in include] + [f"--exclude '{p}'" for p in exclude])
        names = ", ".join(g.name for g in prunable[:5]) + (", …" if len(prunable) > 5 else "")
        raise UsageError(f"{filters} leaves none of the {len(prunable)} prunable groups ({names}); patterns match "
                         "source node names (glob), op types, or kind:channels|neurons|heads|kv-groups|hidden. "
                         "`onnxprune analyze MODEL` lists the groups.")
    return out


def unit_rounding(group: Group, round_to: int) -> int:
    """round_to counts channels; a unit may already be several (a head, a grouped-conv index)."""
    return round_to // math.gcd(round_to, group.channels_per_unit)


def _kept_count(size: int, remove: int, round_to: int, max_ratio: float) -> int:
    remove = min(remove, int(np.floor(size * max_ratio)), size - 1)
    kept = size - max(remove, 0)
    if round_to > 1:
        kept = min(size, int(np.ceil(kept / round_to)) * round_to)
    return kept


def _uniform(groups, scores, ratio, t: Target) -> dict[int, int]:
    def ratio_of(g: Group) -> float:
        return ratio.get(kind_key(g), 0.0) if isinstance(ratio, dict) else ratio

    return {g.id: _kept_count(g.size, int(np.floor(g.size * ratio_of(g))), unit_rounding(g, t.round_to),
                              t.max_ratio) for g in groups}


def _global(groups, scores, ratio, t: Target) -> dict[int, int]:
    values = [np.asarray(scores[g.id], dtype=np.float64).ravel() for g in groups]
    owners = np.repeat(np.array([g.id for g in groups], dtype=np.int64), [len(v) for v in values]).tolist()
    if not owners:
        return {}
    order = np.argsort(np.concatenate(values), kind="stable")
    budget = int(np.floor(len(owners) * ratio))
    caps = {g.id: min(int(np.floor(g.size * t.max_ratio)), g.size - 1) for g in groups}
    removed = {g.id: 0 for g in groups}
    for i in order.tolist():
        if budget == 0:
            break
        gid = owners[i]
        if removed[gid] < caps[gid]:
            removed[gid] += 1
            budget -= 1
    by_id = {g.id: g for g in groups}
    return {gid: _kept_count(by_id[gid].size, r, unit_rounding(by_id[gid], t.round_to), 1.0)
            for gid, r in removed.items()}


def _keep_indices(groups, scores, kept_counts, orders: dict[int, np.ndarray] | None = None
                  ) -> dict[int, np.ndarray]:
    """The `kept_counts[g.id]` best-scored units of each group, ascending; `orders`: each group's units
    best first, when the caller already ranked them (a target's search asks many times)."""
    out = {}
    for g in groups:
        k = kept_counts[g.id]
        order = orders[g.id] if orders is not None else np.argsort(-scores[g.id], kind="stable")
        out[g.id] = np.sort(order[:k])
    return out


def removed_flags(analysis: Analysis, keep: dict[int, np.ndarray]) -> np.ndarray:
    flags = np.zeros(len(analysis.root_of), dtype=bool)
    for gid, kept in keep.items():
        g = analysis.groups[gid]
        mask = np.ones(g.size, dtype=bool)
        mask[kept] = False
        flags[g.roots[mask]] = True
    return flags


def allocate(analysis: Analysis, scores: dict[int, np.ndarray], target: Target,
             estimator: CostEstimator | None = None) -> dict[int, np.ndarray]:
    """group id -> sorted unit indices to keep, for every eligible group."""
    target.check()
    groups = eligible_groups(analysis, target.include, target.exclude)
    by_ratio = _uniform if target.strategy == "uniform" else _global
    orders = {g.id: np.argsort(-scores[g.id], kind="stable") for g in groups}

    def plan_for(ratio: float) -> dict[int, np.ndarray]:
        return _keep_indices(groups, scores, by_ratio(groups, scores, ratio, target), orders)

    if target.ratio is not None:
        return plan_for(target.ratio)

    if estimator is None:
        raise PlanError("FLOP and parameter targets need a cost estimator")
    want_flops = target.target_flops is not None
    goal = target.target_flops if want_flops else target.target_params
    dense = estimator.dense_flops if want_flops else estimator.dense_params
    if dense <= 0:
        raise PlanError("the model's FLOPs could not be computed (shapes unknown); "
                        "fix the dynamic input dimensions with --input-shape")

    def removed_by(keep: dict[int, np.ndarray]) -> float:
        flops, params = estimator.estimate(removed_flags(analysis, keep))
        return 1.0 - (flops if want_flops else params) / dense

    def removed_fraction(ratio: float) -> float:
        return removed_by(plan_for(ratio))

    what = "FLOPs" if want_flops else "parameters"
    if not groups:
        cause = headline(analysis)
        raise PlanError(f"cannot remove {goal:.1%} of {what}: no group of this model is prunable"
                        + (f" ({cause})" if cause else "") + explain(analysis))
    best = removed_fraction(1.0)
    if best < goal:
        raise PlanError(
            f"cannot remove {goal:.1%} of {what}: at most {best:.1%} is removable with "
            f"max_ratio={target.max_ratio} over {len(groups)} prunable groups "
            "(raise --max-ratio, relax --include/--exclude, or lower the target)" + explain(analysis)
        )
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if removed_fraction(mid) >= goal:
            hi = mid
        else:
            lo = mid
    if removed_fraction(hi) <= goal + OVERSHOOT_TOLERANCE:
        return plan_for(hi)
    # rounding makes the ratio move in coarse steps (a 16-channel layer kept in multiples of 8 loses 0 or
    # half): start just below the target and add single rounding steps where they cost least
    start = {g.id: len(kept) for g, kept in zip(groups, plan_for(lo).values())}
    counts = _top_up(groups, scores, start, goal, lambda c: removed_by(_keep_indices(groups, scores, c, orders)),
                     target)
    refined = _keep_indices(groups, scores, counts, orders)
    return refined if goal <= removed_by(refined) < removed_fraction(hi) else plan_for(hi)


# a target may be exceeded by this much (a fraction of the model) before single steps refine the plan
OVERSHOOT_TOLERANCE = 0.02


def _top_up(groups: list[Group], scores: dict[int, np.ndarray], kept: dict[int, int], goal: float,
            removed_by, target: Target) -> dict[int, int]:
    """Kept counts that reach `goal`, from `kept` (below it), one rounding step at a time: each step goes
    to the group whose next units have the least score per fraction of the model they remove (scores
    are comparable across groups: criteria normalise them per group); the last step is the one that
    reaches the goal removing the least."""
    counts = dict(kept)
    current = removed_by(counts)
    while current < goal:
        best = finishing = None
        for g in groups:
            step = unit_rounding(g, target.round_to)
            now = counts[g.id]
            new = (now - 1) // step * step if step > 1 else now - 1  # the next multiple of the rounding below
            if new < max(1, g.size - int(np.floor(g.size * target.max_ratio))):
                continue
            trial = dict(counts)
            trial[g.id] = new
            gained = removed_by(trial) - current
            if gained <= 0:
                continue
            if current + gained >= goal and (finishing is None or gained < finishing[3]):
                finishing = (0.0, g.id, new, gained)
            ranked = np.sort(scores[g.id])  # ascending: the units removed next are the weakest kept
            loss = float(ranked[g.size - now:g.size - new].sum())
            cost = loss / gained
            if best is None or cost < best[0]:
                best = (cost, g.id, new, gained)
        step = finishing or best
        if step is None:
            break
        counts[step[1]] = step[2]
        current += step[3]
    return counts
