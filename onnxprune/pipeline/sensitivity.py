"""`onnxprune sensitivity MODEL --calib DATA`: each group's sensitivity curve, as a table, JSON or figure.

For every prunable group (after --include/--exclude): how far the final
outputs move from the dense model's on calibration data when the group loses
a fraction r of its units, r on a grid, the criterion choosing which units go
(onnxprune.calibration.curves); and what one of its units costs, as a share
of the model's FLOPs (removed alone). Steep curves on cheap groups are what
`--strategy adaptive` spares. And for every residual layer --drop-layers could
remove: the same divergence when that layer alone is dropped, beside its
block influence (what --drop-layers ranks by).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxprune.calibration.ablation import Divergence, divergence_kind
from onnxprune.calibration.capture import Capture
from onnxprune.calibration.curves import SensitivityCurves, units_at
from onnxprune.calibration.data import CalibrationSet
from onnxprune.calibration.influence import block_influence
from onnxprune.errors import UsageError
from onnxprune.options import PruneOptions
from onnxprune.importance import criterion
from onnxprune.pipeline.runner import Stage, run_stages
from onnxprune.pipeline.stages import analyze, calibrate, load, measure_curves, score
from onnxprune.pipeline.state import PruneState
from onnxprune.plotting import require_matplotlib
from onnxprune.passes.depth import DropLayers
from onnxprune.strategy.allocate import removed_flags
from onnxprune.strategy.depth import scan_blocks
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
    layers: list[dict] = field(default_factory=list)  # name, kind, influence, loss when dropped alone

    def to_dict(self) -> dict:
        out = {"model": self.model, "criterion": self.criterion, **self.curves.to_dict(),
               "timings_s": {k: round(v, 3) for k, v in self.timings.items()}, "layers": self.layers}
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
        text = (f"{self.model}: divergence from the dense outputs ({kinds}) on {self.curves.samples} calibration "
                f"samples when a group loses a fraction r of its units ({self.criterion} order)\n"
                + box_table(header, rows))
        if self.layers:
            rows = [(d["name"], d["kind"], f"{d['influence']:.4g}", f"{d['loss']:.3g}") for d in self.layers]
            text += ("\nResidual layers: the divergence when one alone is dropped (--drop-layers), and its block "
                     "influence (1 - cosine of its input and output, what --drop-layers ranks by)\n"
                     + box_table(("layer", "kind", "block influence", "loss dropped"), rows))
        return text

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


def layer_losses(model: onnx.ModelProto, data: Any, samples: int, seed: int = 0) -> list[dict]:
    """Every droppable residual layer of `model`: the divergence of its outputs from the dense ones on
    `samples` calibration samples when that layer alone is dropped, and its block influence there."""
    candidates = scan_blocks(model).candidates("layer")
    if not candidates:
        return []
    calib = CalibrationSet.open(data, model, max_samples=samples)
    influence = block_influence(model, candidates, calib, seed=seed)
    names = [o.name for o in model.graph.output]
    batches = list(calib.batches(32))
    valid = [calib.real_positions(feeds, n) for feeds, n in batches]

    def outputs(m: onnx.ModelProto) -> list[list[np.ndarray]]:
        capture = Capture(m, names)
        return [[v for v in capture.run(feeds, n).values()] for feeds, n in batches]

    dense = outputs(model)
    losses = [Divergence(name, [b[j] for b in dense], kind, valid) for j, name in enumerate(names)
              if (kind := divergence_kind(dense[0][j], "auto")) is not None]
    rows = []
    for unit, unit_influence in zip(candidates, influence.scores):
        dropped = outputs(DropLayers([unit])(model).model)
        loss = sum(d.total(b, dropped[b][j]) for j, d in enumerate(losses) for b in range(len(batches)))
        rows.append({"name": unit.name, "kind": unit.kind, "influence": float(unit_influence),
                     "loss": max(loss / max(len(calib), 1), 0.0)})
    return rows


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
    o = state.options
    layers = layer_losses(state.working, state.calib_data, o.scoring.sensitivity_samples, o.runtime.seed)
    state.clock.lap("layers")
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
                             notes, layers)
