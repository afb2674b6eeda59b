"""The prune pipeline, end to end, as the Python API.

    load -> analyze -> score -> allocate -> rewrite -> validate -> save

`prune()` never modifies the model it is given and writes the output (if
asked) only after the pruned model passed validation and, with
`max_accuracy_drop`, the accuracy gate (onnxprune.runtime.gate).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxprune.analysis import Analysis, analyze_graph
from onnxprune.analysis.diagnose import explain, prunability_causes
from onnxprune.passes.reconstruction import reconstruct
from onnxprune.cost import model_cost
from onnxprune.errors import OnnxPruneError, PlanError, UsageError
from onnxprune.importance import score_groups
from onnxprune.importance.data_aware import criterion_statistics, needs_statistics
from onnxprune.ir.graph_view import GraphView
from onnxprune.ir.model_io import check_no_growth, model_byte_size
from onnxprune.ir.prepare import prepare
from onnxprune.ir.shapes import infer_shapes, output_shapes
from onnxprune.passes.apply_plan import ApplyPlan
from onnxprune.passes.cleanup import CLEANUP
from onnxprune.passes.depth import DropLayers
from onnxprune.passes.lossless import find_dead_structure
from onnxprune.report import GroupChange, ModelStats, PruneReport
from onnxprune.runtime.gate import AccuracyDropError, check_gate_options, compare_latency, compare_quality, \
    pruned_outputs, reference_pass
from onnxprune.runtime.inputs import dense_input_shapes, plan_input_shapes
from onnxprune.runtime.output import save_verified, stage_if_on_disk
from onnxprune.runtime.progress import StageClock
from onnxprune.runtime.validate import validate_model
from onnxprune.strategy.allocate import Target, allocate
from onnxprune.strategy.depth import choose_drops
from onnxprune.strategy.estimate import CostEstimator
from onnxprune.strategy.plan import Plan

ModelLike = str | os.PathLike | onnx.ModelProto


def build_analysis(model: onnx.ModelProto, prune_hidden: bool = False) -> Analysis:
    shapes = infer_shapes(model)
    return analyze_graph(GraphView(model, shapes), hidden_width=prune_hidden)


@dataclass
class AnalysisReport:
    """What `onnxprune analyze` prints: groups, what blocks them, and the cost."""

    analysis: Analysis
    stats: ModelStats
    input_note: str | None = None  # which input shapes were assumed (FLOPs depend on them)

    @property
    def causes(self) -> list[str]:
        """Why groups are blocked (op families, top reasons): see onnxprune.analysis.diagnose."""
        return prunability_causes(self.analysis)

    def to_dict(self) -> dict:
        return {
            "input_shapes_assumed": self.input_note,
            "blocking_causes": self.causes,
            "params": self.stats.params,
            "macs": self.stats.macs,
            "flops": self.stats.flops,
            "op_counts": dict(sorted(self.stats.op_counts.items())),
            "groups": [g.to_dict() for g in self.analysis.groups],
        }


def analyze(model: ModelLike, input_shapes: dict[str, list[int]] | None = None,
            prune_hidden: bool = False) -> AnalysisReport:
    working, source = prepare(model)
    planned = plan_input_shapes(working, input_shapes)  # no run: analyze stays cheap on huge models
    stats = ModelStats.from_cost(model_cost(working, planned.shapes), source.file_size)
    return AnalysisReport(build_analysis(working, prune_hidden), stats, planned.note())


def prune(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    ratio: float | dict[str, float] | None = None,
    target_flops: float | None = None,
    target_params: float | None = None,
    criterion: str = "l1",
    strategy: str = "uniform",
    max_ratio: float = 0.9,
    round_to: int = 8,
    include: list[str] | tuple[str, ...] = (),
    exclude: list[str] | tuple[str, ...] = (),
    lossless: bool = False,
    prune_hidden: bool = False,
    drop_layers: int | None = None,
    drop_unit: str = "layer",
    plan: Plan | str | os.PathLike | None = None,
    save_plan: str | os.PathLike | None = None,
    input_shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
    validate_data: Any = None,
    max_accuracy_drop: float | None = None,
    measure_latency: bool | None = None,
    batch_size: int = 32,
    provider: str = "CPUExecutionProvider",
    threads: int = 1,
    latency_runs: int = 50,
    latency_warmup: int = 5,
    progress: bool | None = None,
    metric: Any = None,
    batch_axis: int = 0,
    class_axis: int | str | None = None,
    calib: Any = None,
    calib_samples: int | None = 512,
    least_squares: bool = True,
    bias_correction: bool = True,
    bn_recalibration: bool = True,
    ablation_samples: int | None = None,
) -> tuple[onnx.ModelProto, PruneReport]:
    """Prune `model`; returns the pruned ModelProto and a report.

    Exactly one of: ratio / target_flops / target_params (fractions REMOVED),
    lossless=True, or plan (a Plan or the path of a saved plan).

    Depth (onnxprune.strategy.depth): `drop_layers=N` removes the N residual
    units with the lowest block influence (1 - cosine similarity of their input
    and output on `calib`, or on random inputs without it, as the report's notes
    say), alone or before a ratio/target; `drop_unit` is "layer" (a transformer
    layer, a ResNet block), "block" (any residual sub-block), "attention" or
    "mlp". The plan records the dropped units under "drop".

    prune_hidden: also prune the hidden (residual-stream) width of transformers
    through LayerNorm / RMSNorm (not lossless: their statistics then cover the
    kept dims only); a ratio may name it: {"hidden": 0.25}.

    Validation gate (onnxprune.runtime.gate): `validate_data` (a path in any
    format `eval` reads, a dict of arrays, or a Dataset from
    onnxprune.runtime.data.open_data) is run through the dense and the pruned
    model, `batch_size` samples at a time (one at a time for a model that
    refuses a batch; `batch_axis`: the inputs' axis holding the samples); the
    report gets top-1/top-5 accuracy (data with labels), the fidelity of every
    output to the dense model, and a custom `metric(outputs, labels)` if given.
    `max_accuracy_drop` bounds the drop of the gated number: the custom metric
    (its own unit, higher is better), else top-1 accuracy with labels, else
    the worst output's fidelity (1 - top-1 agreement for class scores,
    `class_axis` declaring their axis or "none"; 1 - mean cosine similarity
    for other outputs); absolute, 0.02 = 2 points. Past it, prune raises
    AccuracyDropError, carrying the report, and writes nothing (neither the
    model nor the plan). `measure_latency` (default:
    on with validate_data) adds dense vs pruned latency from one interleaved
    onnxruntime benchmark on `provider` with `threads` intra-op threads,
    `latency_warmup` + `latency_runs` runs each. `progress`: bars on stderr
    (None: only when stderr is a terminal).

    Calibration (onnxprune.calibration): `calib` (same formats; labels are
    ignored; at most `calib_samples` samples) feeds the data-aware criteria
    (apoz, mean_act, flap, wanda) and, after the rewrite, the reconstruction
    passes in graph order: least-squares refit of each consumer's kept weights,
    bias compensation where no refit happened, BatchNorm recalibration (output
    statistics matching where BN was folded into the convs); each
    can be switched off, and each is undone if it makes held-out calibration
    fidelity worse. `ablation_samples`: samples per unit for the ablation
    criterion (default 64, lowered with a note when over its FLOP budget).
    """
    width = ratio is not None or target_flops is not None or target_params is not None
    modes = [width, lossless, plan is not None]
    if drop_layers is not None and (lossless or plan is not None):
        raise UsageError("drop_layers (--drop-layers) combines with a ratio or target, not with lossless (dropped "
                        "layers change the outputs) or a plan (a saved plan records its dropped layers)")
    if drop_layers is None and sum(modes) != 1:
        raise UsageError("choose one of: a target (ratio, target_flops, target_params), lossless, or a plan")
    if ablation_samples is not None and ablation_samples < 1:
        raise UsageError(f"ablation_samples (--ablation-samples) must be at least 1, got {ablation_samples}")
    measure_latency = check_gate_options(validate_data, max_accuracy_drop, metric, measure_latency, latency_runs,
                                         latency_warmup, threads, provider)
    clock = StageClock()
    timings, lap = clock.timings, clock.lap

    working, source = prepare(model, output)
    shapes = dense_input_shapes(working, input_shapes, seed, need_outputs=lossless)
    fixed = shapes.shapes
    dense_cost = model_cost(working, fixed)
    before = ModelStats.from_cost(dense_cost, source.file_size)
    expected_shapes = output_shapes(working, fixed)  # only dims inference can tell: some depend on the data
    lap("load")
    dense_ref = None
    if validate_data is not None:  # before any pruning work: data that does not fit fails fast
        dense_ref = reference_pass(working, validate_data, batch_size=batch_size, provider=provider,
                                   progress=progress, metric=metric, batch_axis=batch_axis, class_axis=class_axis)
        lap("evaluate dense")

    reference = shapes.outputs if lossless else None
    if plan is not None and not isinstance(plan, Plan):
        plan = Plan.load(plan)
    calibration = None if calib is None else Calibration(calib, calib_samples, least_squares, bias_correction,
                                                          bn_recalibration, seed, ablation_samples)
    if calibration is not None and (drop_layers is not None or (plan is not None and plan.drop)):
        calibration.reference = working  # the repair restores the outputs from before the drop (passes copy)
    plan, depth = choose_drops(working, drop_layers, drop_unit, plan, calib=calib, calib_samples=calib_samples,
                               input_shapes=fixed, seed=seed, batch_size=batch_size)
    ran = []  # records of the passes that ran before the decision's
    if depth is not None:
        dropped = DropLayers(depth.units)(working)
        working, ran = dropped.model, [dropped.record]
        lap("drop layers")
    if lossless:
        decision = _decide_lossless(working)
    elif depth is not None and not width and plan is None:
        decision = _decide_depth(working, prune_hidden, calibration)
    else:
        target = None
        if plan is None:
            target = Target(ratio, target_flops, target_params, strategy, max_ratio, round_to,
                            list(include), list(exclude))
            target.check()
        decision = _decide(working, plan, target, criterion, seed, dense_cost, lap, calibration, prune_hidden)
    if depth is not None:
        _add_depth(decision, depth, width or plan is not None and bool(plan.groups))
    decision.passes[:0] = ran
    working = decision.pruned  # the dense model and its analysis are released here
    decision.pruned = None
    cleaned = CLEANUP(working)  # copies of a shared vector that kept the same units are one again; unused go
    working = cleaned.model
    decision.passes.append(cleaned.record)
    check_no_growth(working, dense_cost.param_bytes)  # a shared weight sliced per reader: refuse, write nothing
    if source.value_info:  # shapes of intermediate tensors, for a model that listed them
        infer_shapes(working)
    else:  # analysis filled them in; written out, they would make a small model's file grow
        del working.graph.value_info[:]
    lap("rewrite")

    staged = stage_if_on_disk(working, output, source)  # a large model is written once, then run from there
    try:
        return _validate_measure_write(working, fixed, staged, output, source, decision, before, lap, timings,
                                       GateRequest(dense_ref, max_accuracy_drop, measure_latency, model, provider,
                                                   threads, latency_runs, latency_warmup, progress),
                                       ValidationInputs(reference, expected_shapes, seed),
                                       notes=decision.notes + [n for n in [shapes.note()] if n],
                                       depth=depth, save_plan=save_plan)
    finally:
        if staged is not None:
            staged.discard()


@dataclass
class GateRequest:
    """What the gate and the latency measurement need (prune's options, passed on as data)."""

    dense_ref: Any
    max_accuracy_drop: float | None
    measure_latency: bool
    dense_model: Any
    provider: str
    threads: int
    latency_runs: int
    latency_warmup: int
    progress: bool | None


@dataclass
class ValidationInputs:
    reference: list | None  # the dense outputs a lossless result must reproduce
    expected_shapes: list | None
    seed: int


def _validate_measure_write(working, fixed, staged, output, source, decision, before, lap, timings,
                            gate: GateRequest, checks: ValidationInputs, *, notes, depth, save_plan
                            ) -> tuple[onnx.ModelProto, PruneReport]:
    """prune()'s last stages: validate (from the staged file for a large model), measure, gate, write."""
    result = validate_model(working, fixed, reference_outputs=checks.reference,
                            expected_shapes=checks.expected_shapes, seed=checks.seed,
                            run_from=staged.path if staged is not None else None)
    lap("validate")
    runnable = result.serialized or (str(staged.path) if staged is not None else working)
    after = ModelStats.from_cost(model_cost(working, fixed), len(result.serialized or b"") or model_byte_size(working))
    quality = latency = None
    if gate.dense_ref is not None:
        outputs = pruned_outputs(gate.dense_ref, runnable, progress=gate.progress)
        quality = compare_quality(gate.dense_ref, outputs, gate.max_accuracy_drop)
        gate.dense_ref = outputs = None
        lap("evaluate pruned")
    if gate.measure_latency:
        on_disk = str(staged.path) if staged is not None else working
        latency = compare_latency(gate.dense_model, on_disk, provider=gate.provider, threads=gate.threads,
                                  runs=gate.latency_runs, warmup=gate.latency_warmup, input_shapes=fixed,
                                  progress=gate.progress, seed=checks.seed)
        lap("latency")
    report = PruneReport(
        input=str(source.path) if source.path else "<ModelProto>",
        output=str(output) if output is not None else None,
        mode=decision.mode,
        before=before,
        after=after,
        groups_total=decision.groups_total,
        groups_prunable=decision.groups_prunable,
        changes=decision.changes,
        checks=result.checks,
        max_abs_diff=result.max_abs_diff,
        notes=notes,
        timings=timings,
        quality=quality,
        latency=latency,
        depth=depth.to_dict() if depth is not None else None,
        passes=[r.to_dict() for r in decision.passes],
    )
    if quality is not None and quality.passed is False:
        result.serialized = None
        raise AccuracyDropError(f"accuracy gate: {quality.verdict()} Nothing was written; prune less (a smaller "
                                "ratio or target), exclude sensitive layers, or raise the budget.", report)
    if save_plan is not None:
        decision.plan.save(save_plan)
    if staged is not None:  # validation already ran the staged file from disk
        after.file_size = staged.commit()
    elif output is not None:
        after.file_size = save_verified(working, output, result, source=source)
        result.checks.append("read back from disk")
    result.serialized = None
    lap("save")
    return working, report


def _describe(ratio, target_flops, target_params, criterion, strategy) -> str:
    if isinstance(ratio, dict):
        what = "ratio " + ", ".join(f"{k} {v:g}" for k, v in ratio.items()) + " of units removed"
    elif ratio is not None:
        what = f"ratio {ratio:g} of units removed"
    elif target_flops is not None:
        what = f"target: {target_flops:.0%} of FLOPs removed"
    else:
        what = f"target: {target_params:.0%} of parameters removed"
    return f"{what} ({criterion}, {strategy})"


def _keep_from_removed(analysis: Analysis, removed: set[int]) -> dict[int, np.ndarray]:
    keep = {}
    for g in analysis.groups:
        flags = np.array([int(r) not in removed for r in g.roots.tolist()])
        if not flags.all():
            keep[g.id] = np.flatnonzero(flags)
    return keep


def _changes(analysis: Analysis, removed: set[int]) -> list[GroupChange]:
    out = []
    for g in analysis.groups:
        gone = sum(1 for r in g.roots.tolist() if int(r) in removed)
        if gone:
            out.append(GroupChange(g.name, g.sources[0].op_type, g.size, g.size - gone))
    return out


@dataclass
class Decision:
    """What was removed and why, plus the rewritten model."""

    pruned: onnx.ModelProto | None
    plan: Plan
    mode: str
    changes: list[GroupChange]
    groups_total: int
    groups_prunable: int
    notes: list[str]
    passes: list = field(default_factory=list)  # PassRecords of the passes that ran, in order


@dataclass
class Calibration:
    """Calibration data and which reconstruction passes to run (all on by default)."""

    data: Any
    max_samples: int | None = 512
    least_squares: bool = True
    bias_correction: bool = True
    bn_recalibration: bool = True
    seed: int = 0
    ablation_samples: int | None = None  # samples per unit for the ablation criterion (None: its default)
    reference: onnx.ModelProto | None = None  # the model before layers were dropped (None: no drop)


def _reconstruct(working, pruned, analysis, removed, calibration: Calibration):
    """The reconstruction passes, restoring the outputs of the model before any drop (else `working`)."""
    dense = calibration.reference if calibration.reference is not None else working
    return reconstruct(dense, pruned, analysis, removed, calibration.data, max_samples=calibration.max_samples,
                       least_squares=calibration.least_squares, bias_correction=calibration.bias_correction,
                       bn_recalibration=calibration.bn_recalibration, seed=calibration.seed)


def _apply(working, analysis, removed, plan, mode, notes=None, calibration: Calibration | None = None) -> Decision:
    changes = _changes(analysis, removed)
    applied = ApplyPlan(analysis, removed)(working)
    pruned, passes = applied.model, [applied.record]
    notes = list(notes or [])
    if calibration is not None and (removed or calibration.reference is not None):
        pruned, recon = _reconstruct(working, pruned, analysis, removed, calibration)
        notes += recon.summary().splitlines()
        passes.append(recon.record)
        mode += ", reconstructed"
    return Decision(pruned, plan, mode, changes, len(analysis.groups), len(analysis.prunable_groups()), notes,
                    passes)


def _decide(working, plan, target, criterion, seed, dense_cost, lap, calibration: Calibration | None = None,
            prune_hidden: bool = False) -> Decision:
    used_plan = None if plan is None else plan if isinstance(plan, Plan) else Plan.load(plan)
    prune_hidden = prune_hidden or bool(used_plan and used_plan.meta.get("prune_hidden"))
    analysis = build_analysis(working, prune_hidden)
    lap("analyze")
    if used_plan is not None:
        removed = used_plan.removed_roots(analysis)
        return _apply(working, analysis, removed, used_plan, "plan replay", calibration=calibration)
    stats = None
    if calibration is not None and needs_statistics(criterion):
        stats = criterion_statistics(criterion, working, analysis, calibration.data,
                                     max_samples=calibration.max_samples, seed=seed,
                                     ablation_samples=calibration.ablation_samples)
        lap("calibrate")
    scores = score_groups(analysis, analysis.prunable_groups(), criterion, seed, stats=stats)
    lap("score")
    estimator = None if target.ratio is not None else CostEstimator(analysis, dense_cost)
    keep = allocate(analysis, scores, target, estimator)
    lap("allocate")
    removed = set()
    for gid, kept in keep.items():
        flags = np.ones(analysis.groups[gid].size, dtype=bool)
        flags[kept] = False
        removed.update(int(r) for r in analysis.groups[gid].roots[flags])
    mode = _describe(target.ratio, target.target_flops, target.target_params, criterion, target.strategy)
    if not removed:  # never hand back an unchanged copy as if it were pruned
        eligible = len(keep)
        hint = (f" after rounding kept counts up to multiples of {target.round_to} (--round-to): raise the ratio or "
                "lower --round-to" if eligible else "")
        raise PlanError(f"{mode}: nothing to remove in {eligible} eligible group(s){hint}." + explain(analysis))
    meta = {"criterion": criterion, "strategy": target.strategy, "ratio": target.ratio,
            "target_flops": target.target_flops, "target_params": target.target_params,
            "round_to": target.round_to, "prune_hidden": prune_hidden}
    return _apply(working, analysis, removed, Plan.from_keep(analysis, keep, meta), mode,
                  notes=getattr(stats, "notes", None), calibration=calibration)


def _decide_depth(working: onnx.ModelProto, prune_hidden: bool = False,
                  calibration: Calibration | None = None) -> Decision:
    """Depth only (drop_layers without a width target): no group changes; repaired with calibration data."""
    analysis = build_analysis(working, prune_hidden)
    notes, passes = [], []
    if calibration is not None:
        working, recon = _reconstruct(working, working, analysis, set(), calibration)
        notes, passes = recon.summary().splitlines(), [recon.record]
    return Decision(working, Plan(meta={"mode": "drop layers"}), "", [], len(analysis.groups),
                    len(analysis.prunable_groups()), notes, passes)


def _add_depth(decision: Decision, depth, width: bool) -> None:
    decision.plan.drop = list(depth.dropped)
    decision.mode = depth.mode() + (f"; then {decision.mode}" if width and decision.mode else "")
    decision.notes = depth.notes() + list(decision.notes)


def _decide_lossless(working: onnx.ModelProto) -> Decision:
    """Remove zero residual branches (repeatedly), then dead units."""
    found = find_dead_structure(working)
    analysis, removed, branches = found.analysis, found.dead_units, found.branches
    keep = _keep_from_removed(analysis, removed)
    plan = Plan.from_keep(analysis, keep, {"mode": "lossless"})
    notes = [f"removed {branches} all-zero residual branch(es) and {len(removed)} dead unit(s)"]
    if not branches and not removed:
        notes[0] = ("nothing exactly dead was found: the output computes the same as the input"
                    + explain(analysis).replace("\nWhy:\n  - ", "; only prunable groups were searched. ")
                    .replace("\n  - ", "; "))
    decision = _apply(found.model, analysis, removed, plan, "lossless elimination", notes)
    decision.passes.insert(0, found.record)
    return decision


__all__ = ["AnalysisReport", "OnnxPruneError", "analyze", "prune", "prepare"]
