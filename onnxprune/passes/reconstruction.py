"""`reconstruct`: repair a pruned model with calibration data (the pipeline's reconstruct stage).

    pruned = apply_removal(dense, analysis, removed)
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
from onnxprune.passes import reconstruct as passes
from onnxprune.passes.reconstruct import DEFAULT_RIDGE, Fidelity, PassRecord, ReconstructionContext


@dataclass
class ReconstructionReport:
    fit_samples: int
    holdout_samples: int
    fidelity_before: float | None  # held-out relative squared error of the outputs vs the dense model
    fidelity_after: float | None
    agreement_before: float | None = None  # held-out top-1 agreement with the dense model (classifiers)
    agreement_after: float | None = None
    passes: list[PassRecord] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"fit_samples": self.fit_samples, "holdout_samples": self.holdout_samples,
                "fidelity_before": self.fidelity_before, "fidelity_after": self.fidelity_after,
                "agreement_before": self.agreement_before, "agreement_after": self.agreement_after,
                "seconds": round(self.seconds, 3), "notes": self.notes,
                "passes": [p.to_dict() for p in self.passes]}

    def summary(self) -> str:
        lines = [f"reconstruction on {self.fit_samples} calibration samples "
                 f"({self.holdout_samples} held out) in {self.seconds:.1f} s"]
        for p in self.passes:
            if p.skipped:
                continue  # nothing to do (no BN left, everything refit...): in to_dict(), not worth a line
            state = p.status
            fid = "" if p.fidelity_before is None or p.skipped else \
                f": held-out output error {p.fidelity_before:.4g} -> {p.fidelity_after:.4g}"
            lines.append(f"  {p.name}: {state}{fid}{' (' + p.note + ')' if p.note else ''}")
        if self.agreement_before is not None:
            lines.append(f"  held-out top-1 agreement with the dense model: {self.agreement_before:.1%} -> "
                         f"{self.agreement_after:.1%}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


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
) -> tuple[onnx.ModelProto, ReconstructionReport]:
    """Repair `pruned` (= apply_removal(dense, analysis, removed_roots)) with calibration data.

    dense: the reference whose outputs the passes restore: the model
    `analysis` was built on, or the model before layers were dropped from it
    (node and tensor names must match the pruned model's; a node that reads
    another activation than in `dense`, as after a drop, counts as changed). calib_data: a path (.npz, .npy, image folder,
    .jsonl), a dict of arrays, a Dataset or a CalibrationSet; labels are
    ignored. holdout: the fraction kept aside for the guard (0 turns the
    guard off). per_sample: Conv output positions sampled per image for the
    least squares. Neither `dense` nor `pruned` is modified.
    """
    clock = time.perf_counter()
    calib = CalibrationSet.open(calib_data, dense, max_samples=max_samples)
    fit, held = calib.split(holdout, seed)
    masks = analysis.keep_masks(removed_roots) if removed_roots else {}
    rewired = passes.rewired_nodes(dense, pruned)
    ctx = ReconstructionContext(dense, masks, fit, held, batch_size, per_sample, memory_cap, threads, seed, rewired)
    fidelity = Fidelity(ctx)
    current = pruned
    score = fidelity(current)
    agreement = fidelity.last_agreement
    report = ReconstructionReport(len(fit), len(held), score, score, agreement, agreement)
    if len(held) == 0:
        report.notes.append("too few calibration samples for a held-out split: passes are not guarded")
    if not masks and not rewired:
        report.notes.append("nothing was removed: no reconstruction needed")
        report.seconds = time.perf_counter() - clock
        return current, report

    refit: set[str] = set()

    def guarded(name: str, run) -> None:
        nonlocal current, score, agreement
        start = time.perf_counter()
        candidate, layers = run(current)
        if not layers:
            report.passes.append(PassRecord(name, False, score, score, time.perf_counter() - start, layers,
                                            "nothing to do", skipped=True))
            return
        new_score = fidelity(candidate)
        new_agreement = fidelity.last_agreement
        worse_error = new_score is not None and score is not None and not new_score <= score  # NaN is worse
        worse_top1 = new_agreement is not None and agreement is not None and new_agreement < agreement
        better = not (worse_error or worse_top1)
        note = "" if better else ("held-out top-1 agreement with the dense model dropped" if worse_top1 else
                                  "held-out output error grew") + ": kept the model before it"
        record = PassRecord(name, better, score, new_score, time.perf_counter() - start, layers, note)
        record.agreement_before, record.agreement_after = agreement, new_agreement
        report.passes.append(record)
        if better:
            current, score, agreement = candidate, new_score, new_agreement
            report.agreement_after = agreement
            if name == "least_squares":
                refit.update(l.node for l in layers if l.action == "refit")

    if least_squares:
        guarded("least_squares", lambda m: passes.least_squares_refit(m, ctx, ridge=ridge))
    if bias_correction:
        guarded("bias_compensation", lambda m: passes.bias_compensation(m, ctx, analysis, skip=refit))
    if bn_recalibration:
        guarded("bn_recalibration", lambda m: passes.bn_recalibration(m, ctx, skip=refit))
        guarded("output_matching", lambda m: passes.output_matching(m, ctx, skip=refit))
    report.fidelity_after = score
    report.seconds = time.perf_counter() - clock
    return current, report
