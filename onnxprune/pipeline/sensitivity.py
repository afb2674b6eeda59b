"""`onnxprune sensitivity MODEL --calib DATA`: each group's sensitivity curve, as a table, JSON or figure.

For every prunable group (after --include/--exclude): how far the final
outputs move from the dense model's on calibration data when the group loses
a fraction r of its units, r on a grid, the criterion choosing which units go
(onnxprune.calibration.curves); and what one of its units costs, as a share
of the model's FLOPs (removed alone). Steep curves on cheap groups are what
`--strategy adaptive` spares.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxprune.calibration.curves import SensitivityCurves, units_at
from onnxprune.errors import UsageError
from onnxprune.options import PruneOptions
from onnxprune.importance import criterion
from onnxprune.pipeline.runner import Stage, run_stages
from onnxprune.pipeline.stages import analyze, calibrate, load, measure_curves, score
from onnxprune.pipeline.state import PruneState
from onnxprune.plotting import require_matplotlib
from onnxprune.strategy.allocate import removed_flags
from onnxprune.strategy.estimate import CostEstimator
from onnxprune.text import box_table

ModelLike = str | os.PathLike | onnx.ModelProto


@dataclass
class SensitivityReport:
    model: str
    criterion: str
    curves: SensitivityCurves
    flops_per_unit: dict[int, float]  # group id -> share of the model's FLOPs one unit saves alone
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {"model": self.model, "criterion": self.criterion, **self.curves.to_dict(),
               "timings_s": {k: round(v, 3) for k, v in self.timings.items()}}
        for entry in out["curves"]:
            entry["flops_per_unit"] = self.flops_per_unit.get(entry["group"])
        return out

    def rows(self) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        grid = self.curves.grid
        header = ("#", "group", "kind", "units", "FLOPs/unit", *(f"loss r={r:g}" for r in grid))
        rows = []
        for c in self.curves.curves.values():
            cells = [f"{c.loss_at(units_at(c.size, r)):.3g}" for r in grid]
            share = self.flops_per_unit.get(c.group)
            rows.append((str(c.group), c.name, c.kind, str(c.size), "" if share is None else f"{share:.3%}", *cells))
        return header, rows

    def render_table(self) -> str:
        header, rows = self.rows()
        kinds = ", ".join(f"{o}: {k}" for o, k in self.curves.losses.items())
        return (f"{self.model}: divergence from the dense outputs ({kinds}) on {self.curves.samples} calibration "
                f"samples when a group loses a fraction r of its units ({self.criterion} order)\n"
                + box_table(header, rows))

    def plot(self, path: str | os.PathLike) -> None:
        Figure = require_matplotlib()
        fig = Figure(figsize=(6.5, 4.5), layout="constrained")
        ax = fig.subplots()
        for c in self.curves.curves.values():
            xs = [k / c.size for k in c.removed]
            ax.plot(xs, np.maximum(c.losses, 1e-12), marker="o", linewidth=1, label=c.name)
        ax.set_yscale("log")
        ax.set_xlabel("fraction of the group's units removed")
        ax.set_ylabel("divergence from the dense outputs")
        ax.grid(True, alpha=0.3)
        if len(self.curves.curves) <= 16:
            ax.legend(fontsize=6)
        fig.suptitle(f"{os.path.basename(self.model)}: sensitivity per group ({self.criterion})", fontsize=10)
        fig.savefig(path, dpi=120)


def _check(state: PruneState) -> None:
    o = state.options
    o.calibration.check()
    if o.calibration.calib is None:
        raise UsageError("sensitivity is measured on calibration data: give calib= (--calib DATA)")


SENSITIVITY = [
    Stage("check options", _check, timing="load"),
    Stage("load", load),
    Stage("analyze", analyze),
    Stage("calibrate", calibrate, applies=lambda s: criterion(s.options.scoring.criterion).needs_data),
    Stage("score", score),
    Stage("sensitivity", measure_curves),
]


def sensitivity(model: ModelLike, options: PruneOptions | None = None, **keywords: Any) -> SensitivityReport:
    """Sensitivity curves of every eligible group of `model` on `calib` (PruneOptions fields as keywords:
    calib, criterion, sensitivity_grid, sensitivity_samples, include, exclude, prune_hidden, ...)."""
    state = PruneState(PruneOptions.build(options, **keywords), model, None)
    run_stages(state, SENSITIVITY)
    estimator = CostEstimator(state.analysis, state.dense_cost)
    dense = estimator.dense_flops
    per_unit = {}
    for gid in state.curves.curves:
        g = state.analysis.groups[gid]
        flops, _ = estimator.estimate(removed_flags(state.analysis, {gid: np.arange(g.size - 1)}))
        per_unit[gid] = (1.0 - flops / dense) if dense > 0 else None
    name = str(model) if not isinstance(model, onnx.ModelProto) else model.graph.name or "<ModelProto>"
    notes = [n for n in [state.input_shapes.note()] if n] + state.curves.notes
    return SensitivityReport(name, state.options.scoring.criterion, state.curves, per_unit, state.clock.timings,
                             notes)
