"""Sensitivity curves: how far the final outputs move when a group loses a fraction r of its units.

For every group and every r on a small grid, the r-fraction of its units that
its criterion ranks lowest (the ones a plan would remove first) are gated off
where their consumers read them — exactly what removal does — and the
divergence of the model's outputs from the dense outputs on calibration data
is measured (KL for class scores, relative MSE otherwise; see
onnxprune.calibration.ablation). A gated-off position reads its mean on the
calibration data rather than zero, as after the repair (bias compensation or
the refit's bias keep the mean). No labels are needed.

Cost: one gated session per group that runs only the part of the model after
the group's gates (its suffix), fed from one capture of the dense prefix; the
grid's points are batched over the calibration samples. A group costs
len(grid) + 1 passes of `samples` samples through its suffix.

The curves drive adaptive allocation (onnxprune.strategy.adaptive): each
group loses what costs the least predicted divergence per FLOP it saves.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import onnx

from onnxprune.calibration.ablation import DEFAULT_BUDGET_FLOPS, GroupProbe, check_float_outputs, check_loss, \
    plan_probes
from onnxprune.errors import UsageError
from onnxprune.runtime.progress import Progress

DEFAULT_GRID = (0.1, 0.25, 0.5, 0.75, 0.9)
DEFAULT_CURVE_SAMPLES = 64


@dataclass
class Curve:
    """One group's measured divergence after removing `removed[i]` of its `size` units."""

    group: int
    name: str
    kind: str
    size: int
    removed: list[int]
    losses: list[float]

    def loss_at(self, units_removed: float) -> float:
        """Piecewise-linear in units removed through (0, 0) and the measured points; past the last point
        the last segment's slope continues (a loss never decreases with more removed)."""
        xs = [0.0, *map(float, self.removed)]
        ys = [0.0, *np.maximum.accumulate(np.maximum(self.losses, 0.0)).tolist()]
        if units_removed <= xs[-1]:
            return float(np.interp(units_removed, xs, ys))
        slope = (ys[-1] - ys[-2]) / max(xs[-1] - xs[-2], 1e-12)
        return ys[-1] + max(slope, 0.0) * (units_removed - xs[-1])

    def to_dict(self) -> dict:
        return {"group": self.group, "name": self.name, "kind": self.kind, "size": self.size,
                "points": [{"removed": k, "ratio": round(k / self.size, 4), "loss": round(v, 8)}
                           for k, v in zip(self.removed, self.losses)]}


@dataclass
class SensitivityCurves:
    curves: dict[int, Curve]
    grid: tuple[float, ...]
    samples: int
    losses: dict[str, str] = field(default_factory=dict)  # output -> "kl" / "mse"
    runs: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"grid": list(self.grid), "samples": self.samples, "losses": self.losses, "runs": self.runs,
                "seconds": round(self.seconds, 3), "notes": self.notes,
                "curves": [c.to_dict() for c in self.curves.values()]}


def check_grid(grid: Sequence[float]) -> tuple[float, ...]:
    values = tuple(sorted(set(float(r) for r in grid)))
    if not values or not all(0.0 < r < 1.0 for r in values):
        raise UsageError(f"a sensitivity grid is fractions of units removed in (0, 1), e.g. 0.1,0.25,0.5; "
                         f"got {list(grid)}")
    return values


def units_at(size: int, ratio: float) -> int:
    """Units removed at `ratio`: at least one, never all."""
    return min(max(1, int(round(size * ratio))), size - 1)


def sensitivity_curves(
    model: onnx.ModelProto,
    analysis,
    data: Any,
    orders: dict[int, np.ndarray],
    *,
    grid: Sequence[float] = DEFAULT_GRID,
    samples: int = DEFAULT_CURVE_SAMPLES,
    budget_flops: float | None = DEFAULT_BUDGET_FLOPS,
    batch_size: int = 64,
    max_samples: int | None = None,
    loss: str = "auto",
    seed: int = 0,
    threads: int = 0,
    progress: bool | None = None,
    fill: str = "refit",
) -> SensitivityCurves:
    """Curves of the groups in `orders` (group id -> unit indices, the first removed first) on `model`
    (the model `analysis` was built on), measured on a seeded subset of `samples` calibration samples.

    fill: what a removed unit's positions read (onnxprune.calibration.ablation.plan_probes): "zero";
    "mean", their mean on the calibration data (bias compensation); "refit" (the default), their
    least-squares prediction from the positions kept, which is what the repair's refit of the consumer
    gives back: the curve measures what the repair cannot."""
    check_loss(loss)
    grid = check_grid(grid)
    clock = time.perf_counter()
    groups = [analysis.groups[gid] for gid in orders if analysis.groups[gid].size > 1]
    probes = plan_probes(model, analysis, data, groups, samples=samples, runs_per_group=len(grid) + 1,
                         budget_flops=budget_flops, batch_size=batch_size, max_samples=max_samples, seed=seed,
                         fill=fill)
    curves: dict[int, Curve] = {}
    kinds: dict[str, str] = {}
    runs = 0
    with Progress(len(probes.plans), "sensitivity curves", enabled=progress) as bar:
        for g, _, part in probes.plans:
            probe = GroupProbe(probes, g, part, loss, threads)
            kinds.update(probe.kinds)
            removed = sorted(set(units_at(g.size, r) for r in grid))
            order = np.asarray(orders[g.id])
            losses = [probe.loss(order[:k]) for k in removed]
            curves[g.id] = Curve(g.id, g.name, g.kind, g.size, removed, losses)
            runs += probe.runs
            bar.update()
    check_float_outputs(model, probes, kinds)
    return SensitivityCurves(curves, grid, probes.samples, kinds, runs, time.perf_counter() - clock, probes.notes)


def removal_orders(scores: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Per group, its units weakest first: the order every allocation removes them in (the reverse of
    the keep order of onnxprune.strategy.allocate, ties included)."""
    return {gid: np.argsort(-np.asarray(s), kind="stable")[::-1] for gid, s in scores.items()}
