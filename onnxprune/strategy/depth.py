"""Depth pruning: choose the residual layers (or blocks) to drop and say why; the drop itself is
the pass `onnxprune.passes.depth.DropLayers`.

    depth = choose_layers(model, 2, unit="layer", calib="calib.npz")
    depth.dropped      # [{"name": "/transformer/h.1", "influence": 0.031, ...}]
    DropLayers(depth.units)(model).model

The `count` units of the requested kind with the lowest block influence
(`calibration.influence`) are chosen; units that cannot be dropped
(`analysis.blocks`: projection shortcuts, post-norm sub-blocks...) are listed
with their reasons. Asking for more units than can go is a PlanError naming
what was found.

Plans record what was dropped under an optional ``"drop"`` key (a list of
{"unit", "name", "adds", "input", "output", "influence"}); `replay_drops`
finds the units of such a list in the same model again, matching them by
their residual nodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxprune.analysis.blocks import UNIT_KINDS, BlockScan, Unit, find_blocks
from onnxprune.calibration.influence import block_influence
from onnxprune.errors import PlanError, UsageError
from onnxprune.ir.graph_view import GraphView
from onnxprune.ir.shapes import infer_shapes

UNIT_WORDS = {"layer": "layer", "block": "residual block", "attention": "attention block", "mlp": "feed-forward block"}


@dataclass
class DepthReport:
    """What depth pruning found, scored and removed."""

    unit: str
    requested: int
    source: str = ""                                    # how influence was measured
    candidates: list[dict] = field(default_factory=list)  # every droppable unit with its influence
    dropped: list[dict] = field(default_factory=list)     # the ones removed (plan entries)
    not_droppable: list[dict] = field(default_factory=list)  # name, reason
    replayed: bool = False
    units: list[Unit] = field(default_factory=list, repr=False)  # the chosen units, for passes.depth.DropLayers

    def mode(self) -> str:
        word = UNIT_WORDS.get(self.unit, self.unit)
        if self.replayed:
            return f"{len(self.dropped)} {word}(s) dropped (plan)"
        return f"{len(self.dropped)} {word}(s) dropped (lowest block influence)"

    def notes(self) -> list[str]:
        lines = []
        for d in self.dropped:
            score = "" if d.get("influence") is None else f", block influence {d['influence']:.4g}"
            lines.append(f"dropped {d['unit']} {d['name']} ({d['kind']}{score})")
        kept = [c for c in self.candidates if c["name"] not in {d["name"] for d in self.dropped}]
        if kept:
            lines.append("kept: " + ", ".join(f"{c['name']} ({c['influence']:.4g})" for c in kept))
        if self.source:
            lines.append(self.source)
        for r in self.not_droppable[:3]:
            lines.append(f"not droppable: {r['name']}: {r['reason']}")
        if len(self.not_droppable) > 3:
            lines.append(f"... and {len(self.not_droppable) - 3} more not droppable")
        return lines

    def to_dict(self) -> dict:
        return {"unit": self.unit, "requested": self.requested, "influence": self.source,
                "dropped": self.dropped, "candidates": self.candidates, "not_droppable": self.not_droppable}


def scan_blocks(model: onnx.ModelProto) -> BlockScan:
    return find_blocks(GraphView(model, infer_shapes(model)))


def choose_layers(model: onnx.ModelProto, count: int, *, unit: str = "layer", calib: Any = None,
                  calib_samples: int | None = 512, input_shapes: dict[str, list[int]] | None = None,
                  seed: int = 0, batch_size: int = 32) -> DepthReport:
    """The `count` units of kind `unit` with the lowest block influence (`DepthReport.units`)."""
    if unit not in UNIT_KINDS:
        raise UsageError(f"unknown depth unit '{unit}': choose one of {', '.join(UNIT_KINDS)}")
    if count < 1:
        raise UsageError(f"drop_layers must be at least 1, got {count}")
    scan = scan_blocks(model)
    candidates = scan.candidates(unit)
    refused = [{"name": n, "reason": r} for n, r in scan.not_droppable(unit)]
    report = DepthReport(unit, count, not_droppable=refused)
    if count > len(candidates):
        raise PlanError(_too_many(count, unit, candidates, refused))
    result = block_influence(model, candidates, calib, max_samples=calib_samples, batch_size=batch_size,
                             input_shapes=input_shapes, seed=seed)
    report.source = result.describe()
    report.candidates = [_entry(u, s) for u, s in zip(candidates, result.scores)]
    order = sorted(range(len(candidates)), key=lambda k: (result.scores[k], k))[:count]
    chosen = [candidates[k] for k in sorted(order)]
    report.dropped = [_entry(candidates[k], result.scores[k]) for k in sorted(order)]
    report.units = chosen
    return report


def replay_drops(model: onnx.ModelProto, entries: list[dict]) -> DepthReport:
    """The units a plan recorded as dropped, found in `model` by their residual nodes."""
    scan = scan_blocks(model)
    chosen: list[Unit] = []
    dropped = []
    for e in entries:
        units = {tuple(u.adds): u for u in scan.units(e.get("unit", "layer"))}
        u = units.get(tuple(e["adds"]))
        if u is None:
            raise PlanError(f"the plan drops {e.get('unit', 'layer')} '{e.get('name')}' (residual node(s) "
                            f"{', '.join(e['adds'])}), which this model does not have; was the plan made for "
                            "another model?")
        if not u.droppable:
            raise PlanError(f"the plan drops {u.unit} '{u.name}', which cannot be dropped: {u.refused}")
        chosen.append(u)
        dropped.append({**_entry(u, e.get("influence")), "name": e.get("name", u.name)})
    units = {e.get("unit", "layer") for e in entries}
    return DepthReport(units.pop() if len(units) == 1 else "mixed", len(entries), dropped=dropped, replayed=True,
                       units=chosen)


def _entry(u: Unit, score: float | None) -> dict:
    return {"unit": u.unit, "name": u.name, "kind": u.kind, "adds": list(u.adds), "input": u.input,
            "output": u.output, "influence": None if score is None else round(float(score), 6)}


def _too_many(count: int, unit: str, candidates: list[Unit], refused: list[dict]) -> str:
    word = UNIT_WORDS[unit]
    text = f"cannot drop {count} {word}(s): the model has {len(candidates)} that can be dropped"
    if candidates:
        text += " (" + ", ".join(u.name for u in candidates[:8]) + (", ..." if len(candidates) > 8 else "") + ")"
    if refused:
        text += f"; {len(refused)} more cannot: " + "; ".join(f"{r['name']}: {r['reason']}" for r in refused[:2])
        if len(refused) > 2:
            text += f" (and {len(refused) - 2} more)"
    if unit != "layer" and any("post-norm" in r["reason"] for r in refused):
        text += ". Post-norm models drop whole layers: use unit 'layer' (--drop-unit layer)"
    return text + (f". Ask for at most {len(candidates)}." if candidates else ".")


def choose_drops(model: onnx.ModelProto, count: int | None, unit: str, plan: Any,
                 **scoring) -> tuple[Any, DepthReport | None]:
    """The pipeline's depth choice: (plan, DepthReport or None); `DropLayers(report.units)` drops them.

    With `count`, choose that many units by block influence (`scoring`: calib, calib_samples,
    input_shapes, seed, batch_size); else the drops a plan records. A plan given as a path comes
    back loaded.
    """
    from onnxprune.strategy.plan import Plan

    if plan is not None and not isinstance(plan, Plan):
        plan = Plan.load(plan)
    if count is not None:
        return plan, choose_layers(model, count, unit=unit, **scoring)
    if plan is not None and plan.drop:
        return plan, replay_drops(model, plan.drop)
    return plan, None
