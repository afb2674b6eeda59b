"""The prune pipeline, end to end, as the Python API: `analyze` and `prune`.

`prune` runs three lists of stages (onnxprune.pipeline.stages) over one state
(onnxprune.pipeline.state): LOAD (read and size the model, run the dense model
on validation data), DECIDE (drop layers, analyze, score, allocate — or replay
a plan, or find dead structure), then REWRITE and FINISH (apply, repair,
validate, measure, gate, save). It never modifies the model it is given, and
writes the output (if asked) only after the pruned model passed validation
and, with `max_accuracy_drop`, the accuracy gate.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import onnx

from onnxprune.analysis import Analysis
from onnxprune.analysis.diagnose import prunability_causes
from onnxprune.cost import model_cost
from onnxprune.errors import OnnxPruneError
from onnxprune.ir.prepare import prepare
from onnxprune.options import PruneOptions
from onnxprune.pipeline.progressive import prune_progressively
from onnxprune.pipeline.runner import Stage, at_sizes_the_dense_model_runs, run_stages
from onnxprune.pipeline.stages import DECIDE, FINISH, LOAD, REWRITE, build_analysis, sizes_checked_on_failure
from onnxprune.pipeline.state import PruneState
from onnxprune.report import ModelStats, PruneReport
from onnxprune.runtime.inputs import plan_input_shapes

ModelLike = str | os.PathLike | onnx.ModelProto


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
            prune_hidden: bool = False, prune_cache: bool = False) -> AnalysisReport:
    working, source = prepare(model)
    planned = plan_input_shapes(working, input_shapes)  # no run: analyze stays cheap on huge models
    stats = ModelStats.from_cost(model_cost(working, planned.shapes), source.file_size)
    return AnalysisReport(build_analysis(working, prune_hidden, prune_cache), stats, planned.note())


def prune(model: ModelLike, output: str | os.PathLike | None = None, options: PruneOptions | None = None,
          **keywords: Any) -> tuple[onnx.ModelProto, PruneReport]:
    """Prune `model`; returns the pruned ModelProto and a report.

    Options (onnxprune.options): a PruneOptions, and/or its fields as keywords
    (`prune(m, out, target_flops=0.5, criterion="flap", calib="calib.npz")`;
    keywords win over `options`). Exactly one of: ratio / target_flops /
    target_params (fractions REMOVED), lossless=True, or plan (a Plan or the
    path of a saved plan).

    Strategy: with `calib` and one ratio or target for every kind, in one step,
    the default is "adaptive" (per-group ratios from sensitivity curves, kept
    only if its repaired outputs are no further from the dense model's on
    held-out calibration samples than those of the uniform plan); otherwise
    "uniform". Name `strategy` ("uniform", "global", "adaptive") to choose.

    Depth (onnxprune.strategy.depth): `drop_layers=N` removes the N residual
    units with the lowest block influence (1 - cosine similarity of their input
    and output on `calib`, or on random inputs without it, as the report's notes
    say), alone or before a ratio/target; `drop_unit` is "layer" (a transformer
    layer, a ResNet block), "block" (any residual sub-block), "attention" or
    "mlp". The plan records the dropped units under "drop".

    prune_hidden: also prune the hidden (residual-stream) width of transformers
    through LayerNorm / RMSNorm (not lossless: their statistics then cover the
    kept dims only); a ratio may name it: {"hidden": 0.25}.

    prune_cache: heads and KV groups of a decoder with a key-value cache
    (past_key_values.* inputs, present.* outputs) go from the cache too: the
    pruned model declares and reads fewer heads there, is validated with a
    cache of that size, and the report's `attention` lists the
    num_attention_heads / num_key_value_heads per layer a generation config
    needs (`cache`: the heads each cache input and output now holds).

    Validation gate (onnxprune.runtime.gate): `validate_data` (a path in any
    format `eval` reads, read with the data options — tokenizer, preprocess —,
    a dict of arrays, or a Dataset from onnxprune.runtime.data.open_data) is
    run through the dense and the pruned model, `batch_size` samples at a time
    (one at a time for a model that refuses a batch; `batch_axis`: the inputs'
    axis holding the samples); the report gets top-1/top-5 accuracy (data with
    labels), the fidelity of every output to the dense model, and a custom
    `metric(outputs, labels)` if given (a function, or "FILE.py:FUNCTION").
    `max_accuracy_drop` bounds the drop of the gated number: the custom metric
    (its own unit, higher is better), else top-1 accuracy with labels, else
    the worst output's fidelity (1 - top-1 agreement for class scores,
    `class_axis` declaring their axis or "none"; 1 - mean cosine similarity
    for other outputs); absolute, 0.02 = 2 points. Past it, prune raises
    AccuracyDropError, carrying the report, and writes nothing (neither the
    model nor the plan). `measure_latency` (default: on with validate_data)
    adds dense vs pruned latency from one interleaved onnxruntime benchmark on
    `provider` with `threads` intra-op threads, `latency_warmup` +
    `latency_runs` runs each. `progress`: bars on stderr (None: only when
    stderr is a terminal).

    Calibration (onnxprune.calibration): `calib` (same formats; labels are
    ignored; at most `calib_samples` samples) feeds the data-aware criteria
    (apoz, mean_act, flap, wanda) and, after the rewrite, the reconstruction
    passes in graph order: least-squares refit of each consumer's kept weights,
    bias compensation where no refit happened, BatchNorm recalibration (output
    statistics matching where BN was folded into the convs); each can be
    switched off, and each is undone if it makes held-out calibration fidelity
    worse. `ablation_samples`: samples per unit for the ablation criterion
    (default 64, lowered with a note when over its FLOP budget).

    Progressive (onnxprune.pipeline.progressive): `steps=N` reaches the
    target in N parts (`schedule` "linear" or "cubic"), each re-scoring,
    removing, repairing and measuring the current model; with
    `max_accuracy_drop` it stops before the budget is exceeded and keeps the
    last model within it. The report's `steps` lists them.
    """
    options = PruneOptions.build(options, **keywords)

    def run(input_shapes) -> tuple[onnx.ModelProto, PruneReport]:
        state = PruneState(options, model, output, input_shapes=input_shapes)
        if options.target.steps > 1:
            with sizes_checked_on_failure(state):
                return prune_progressively(state)
        return finish(state, LOAD + DECIDE)

    return at_sizes_the_dense_model_runs(run)


def finish(state: PruneState, first: list[Stage]) -> tuple[onnx.ModelProto, PruneReport]:
    """Run `first`, then the rewrite and the finishing stages; a staged output never outlives the call."""
    try:
        with sizes_checked_on_failure(state):
            run_stages(state, first + REWRITE + FINISH)
        return state.working, state.report
    finally:
        if state.staged is not None:
            state.staged.discard()


__all__ = ["AnalysisReport", "OnnxPruneError", "PruneOptions", "analyze", "build_analysis", "prepare", "prune"]
