"""`reconstruct`: repair a pruned model with calibration data (the pipeline's reconstruct stage).

    pruned = ApplyPlan(analysis, removed)(dense).model
    repaired, report = reconstruct(dense, pruned, analysis, removed, "calib.npz")

The calibration samples are split (seeded) into a fit part and a held-out
part. The passes of `onnxprune.passes.reconstruct` run in this order, each
with a switch:

1. least-squares refit of every changed Conv/Gemm/MatMul (`least_squares`);
2. bias compensation of consumers that lost inputs and were not refit
   (`bias_correction`);
3. BatchNorm statistics recalibration (`bn_recalibration`): running
   statistics re-estimated where BN nodes remain (except right after a
   refit consumer, whose outputs already match the dense model's), and, where BN was folded
   into the convolutions, per-channel output statistics matching of the
   changed Conv/Gemm that were not refit (two passes in the report,
   `bn_recalibration` and `output_matching`, under one switch).

Held-out guard: after each pass the relative squared error of the model's
outputs against the dense model's on the held-out split is measured, and,
for a classifier output (N, classes), the top-1 agreement with the dense
model; a pass that makes either worse is undone (the model from before the
pass is kept) and the report says so. (Squared error alone is not enough: a
bias shift can lower the logits' error while moving the arg-max.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxprune.calibration.capture import DEFAULT_MEMORY_CAP
from onnxprune.calibration.data import CalibrationSet
from onnxprune.passes.protocol import NOTHING_TO_DO, Guarded, Pass, PassRecord, PassResult, Verdict
from onnxprune.passes.least_squares import DEFAULT_RIDGE, LeastSquaresRefit
from onnxprune.passes.reconstruct import (
    BiasCompensation,
    BnRecalibration,
    Fidelity,
    OutputMatching,
    ReconstructionContext,
    rewired_nodes,
)

# how the summary words a guarded pass's verdict
STATUS = {"kept": "applied", "undone": "rejected", NOTHING_TO_DO: "skipped"}


@dataclass
class ReconstructionReport:
    fit_samples: int
    holdout_samples: int
    fidelity_before: float | None  # held-out relative squared error of the outputs vs the dense model
    fidelity_after: float | None
    agreement_before: float | None = None  # held-out top-1 agreement with the dense model (classifiers)
    agreement_after: float | None = None
    pooled_after: float | None = None  # held-out error of the outputs' means over positions (sequences)
    passes: list[PassRecord] = field(default_factory=list)  # one guarded record per pass, in order
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def record(self) -> PassRecord:
        """The whole reconstruction as one record (the passes as its children), for the prune report."""
        modified = any(p.modified for p in self.passes)
        kept = [p.name for p in self.passes if p.modified]
        summary = ("kept " + ", ".join(kept)) if kept else self.notes[0] if self.notes else "no pass kept"
        details = {k: v for k, v in self.to_dict().items() if k not in ("passes", "seconds")}
        return PassRecord("reconstruction", modified, summary, details, list(self.passes), self.seconds)

    def to_dict(self) -> dict:
        return {"fit_samples": self.fit_samples, "holdout_samples": self.holdout_samples,
                "fidelity_before": self.fidelity_before, "fidelity_after": self.fidelity_after,
                "agreement_before": self.agreement_before, "agreement_after": self.agreement_after,
                "pooled_after": self.pooled_after, "seconds": round(self.seconds, 3), "notes": self.notes,
                "passes": [p.to_dict() for p in self.passes]}

    def summary(self) -> str:
        lines = [f"reconstruction on {self.fit_samples} calibration samples "
                 f"({self.holdout_samples} held out) in {self.seconds:.1f} s"]
        for p in self.passes:
            verdict = p.details["verdict"]
            if verdict == NOTHING_TO_DO:
                continue  # nothing to do (no BN left, everything refit...): in to_dict(), not worth a line
            before, after = p.details.get("fidelity_before"), p.details.get("fidelity_after")
            fid = "" if before is None else f": held-out output error {before:.4g} -> {after:.4g}"
            note = "" if verdict == "kept" else f" ({p.details['reason']}: kept the model before it)"
            lines.append(f"  {p.name}: {STATUS[verdict]}{fid}{note}")
        if self.agreement_before is not None:
            lines.append(f"  held-out top-1 agreement with the dense model: {self.agreement_before:.1%} -> "
                         f"{self.agreement_after:.1%}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


class HeldOutFidelity:
    """The reconstruction passes' judge: keep a pass's result when the held-out output error against
    the dense model does not grow and, for a classifier output, the top-1 agreement with the dense
    model does not drop. (Squared error alone is not enough: a bias shift can lower the logits'
    error while moving the arg-max.) The scores of the last kept model are remembered."""

    def __init__(self, fidelity: Fidelity, model: onnx.ModelProto):
        self.fidelity = fidelity
        self.model = model
        self.score = fidelity(model)
        self.agreement, self.pooled = fidelity.last_agreement, fidelity.last_pooled

    def __call__(self, before: onnx.ModelProto, after: onnx.ModelProto) -> Verdict:
        if before is not self.model:  # not the model judged last: measure it
            self.model, self.score = before, self.fidelity(before)
            self.agreement, self.pooled = self.fidelity.last_agreement, self.fidelity.last_pooled
        score, agreement, pooled = self.fidelity(after), self.fidelity.last_agreement, self.fidelity.last_pooled
        details = {"fidelity_before": self.score, "fidelity_after": score,
                   "agreement_before": self.agreement, "agreement_after": agreement}
        worse_error = score is not None and self.score is not None and not score <= self.score  # NaN is worse
        worse_top1 = agreement is not None and self.agreement is not None and agreement < self.agreement
        if worse_top1:
            return Verdict(False, "held-out top-1 agreement with the dense model dropped", details)
        if worse_error:
            return Verdict(False, "held-out output error grew", details)
        self.model, self.score, self.agreement, self.pooled = after, score, agreement, pooled
        return Verdict(True, "held-out fidelity did not get worse", details)


def reconstruct(
    dense: onnx.ModelProto,
    pruned: onnx.ModelProto,
    analysis,
    removed_roots: set[int],
    calib_data: Any,
    *,
    least_squares: bool = True,
    bias_correction: bool = True,
    bn_recalibration: bool = True,
    holdout: float = 0.2,
    max_samples: int | None = None,
    batch_size: int = 32,
    per_sample: int | None = 64,
    ridge: tuple[float, ...] = DEFAULT_RIDGE,
    memory_cap: int = DEFAULT_MEMORY_CAP,
    threads: int = 0,
    seed: int = 0,
    class_axis: int | None = None,
) -> tuple[onnx.ModelProto, ReconstructionReport]:
    """Repair `pruned` (= ApplyPlan(analysis, removed_roots)(dense).model) with calibration data.

    dense: the reference whose outputs the passes restore: the model
    `analysis` was built on, or the model before layers were dropped from it
    (node and tensor names must match the pruned model's; a node that reads
    another activation than in `dense`, as after a drop, counts as changed). calib_data: a path (.npz, .npy, image folder,
    .jsonl), a dict of arrays, a Dataset or a CalibrationSet; labels are
    ignored. holdout: the fraction kept aside for the guard (0 turns the
    guard off). per_sample: Conv output positions sampled per image for the
    least squares. class_axis: the first output's class axis, when it holds
    a sequence of class scores (the guard then also keeps the top-1
    agreement per position from dropping). Neither `dense` nor `pruned` is
    modified.
    """
    clock = time.perf_counter()
    calib = CalibrationSet.open(calib_data, dense, max_samples=max_samples)
    fit, held = calib.split(holdout, seed)
    masks = analysis.keep_masks(removed_roots) if removed_roots else {}
    rewired = rewired_nodes(dense, pruned)
    ctx = ReconstructionContext(dense, masks, fit, held, batch_size, per_sample, memory_cap, threads, seed, rewired,
                                class_axis)
    judge = HeldOutFidelity(Fidelity(ctx), pruned)
    report = ReconstructionReport(len(fit), len(held), judge.score, judge.score, judge.agreement, judge.agreement)
    if len(held) == 0:
        report.notes.append("too few calibration samples for a held-out split: passes are not guarded")
    current = pruned
    if not masks and not rewired:
        report.notes.append("nothing was removed: no reconstruction needed")
    else:
        current = _run_passes(pruned, ctx, analysis, judge, report, (least_squares, bias_correction,
                                                                      bn_recalibration), ridge)
    report.fidelity_after, report.agreement_after, report.pooled_after = judge.score, judge.agreement, judge.pooled
    report.seconds = time.perf_counter() - clock
    return current, report


def _run_passes(model: onnx.ModelProto, ctx: ReconstructionContext, analysis, judge: HeldOutFidelity,
                report: ReconstructionReport, switches: tuple[bool, bool, bool], ridge) -> onnx.ModelProto:
    """The passes in order, each guarded by held-out fidelity; their records go into `report`.
    The consumers a kept least-squares pass refit are left alone by the later passes (their outputs
    already match the dense model's)."""
    least_squares, bias_correction, bn_recalibration = switches

    def guarded(p: Pass) -> PassResult:
        nonlocal model
        result = Guarded(p, judge)(model)
        report.passes.append(result.record)
        model = result.model
        return result

    refit: set[str] = set()
    if least_squares:
        result = guarded(LeastSquaresRefit(ctx, ridge))
        if result.modified:
            [tried] = result.record.children
            refit = {layer["node"] for layer in tried.details["layers"] if layer["action"] == "refit"}
    if bias_correction:
        guarded(BiasCompensation(ctx, analysis, skip=refit))
    if bn_recalibration:
        guarded(BnRecalibration(ctx, skip=refit))
        guarded(OutputMatching(ctx, skip=refit))
    return model
