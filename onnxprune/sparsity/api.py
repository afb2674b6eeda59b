"""`sparsify()`: zero individual weights of Conv/Gemm/MatMul, then validate, gate and save as `prune` does.

    load -> find weights -> zero + update -> validate -> gate -> save

(SparseGPT calibrates inside "zero + update", level by level on the model
sparsified so far: sequential.py; Wanda reads the dense model's Gram
matrices in a "calibrate" stage before it.)

Loading, validation, measuring, the gate and the save are prune's own stages
(onnxprune.pipeline.stages) over a SparsifyState; only the middle is this
package's.

The model keeps its graph and shapes: only weight values change, so `prune`
then `sparsify` composes (structure first, sparsity inside what remains).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxprune.calibration.data import CalibrationSet
from onnxprune.calibration.stats import GramRequest, collect_statistics
from onnxprune.errors import PlanError, UsageError
from onnxprune.ir.graph_view import tensor_values
from onnxprune.ir.model_io import NewValues
from onnxprune.ir.prepare import ModelLike
from onnxprune.ir.shapes import infer_shapes
from onnxprune.options import SparsifyOptions, with_keywords
from onnxprune.passes.cleanup import ReshareInitializers
from onnxprune.pipeline.runner import Stage, at_sizes_the_dense_model_runs, run_stages
from onnxprune.pipeline.stages import evaluate_dense, evaluate_pruned, gate, load, measure_latency, save, \
    sizes_checked_on_failure, validate
from onnxprune.pipeline.state import PruneState
from onnxprune.runtime.gate import check_gate_options
from onnxprune.runtime.metrics import load_metric
from onnxprune.runtime.progress import progress_iter
from onnxprune.sparsity.layers import CRITERIA, NEEDS_CALIBRATION, LayerResult, Selection, Solver, WeightTarget, \
    find_targets
from onnxprune.sparsity.masks import Pattern
from onnxprune.sparsity.sequential import solve_in_levels
from onnxprune.sparsity.report import SparsifyReport

# Gram accumulators (float64, features^2 each) held per pass over the calibration data: the weights
# are split into passes under this many bytes, so a decoder's 11008-wide MLP gets a pass of its own
GRAM_MEMORY_CAP = 1 << 30


@dataclass
class SparsifyState(PruneState):
    """prune's state, for a run that zeroes weights: nothing to reproduce exactly, no plan to write."""

    pattern: Pattern | None = None
    selection: Selection | None = None
    grams: dict | None = None
    samples: int | None = None
    layers: list[LayerResult] | None = None
    distillation: Any = None  # autodiff.distill.DistillResult, when --distill ran

    @property
    def lossless(self) -> bool:
        return False

    @property
    def plan_path(self):
        return None

    @property
    def gate_advice(self) -> str:
        return ("sparsify less (a lower --sparsity), use --criterion sparsegpt with --calib, exclude sensitive "
                "layers, or raise the budget.")


def sparsify(model: ModelLike, output: str | os.PathLike | None = None, options: SparsifyOptions | None = None,
             **keywords: Any) -> tuple[onnx.ModelProto, SparsifyReport]:
    """Zero individual weights of every Conv/Gemm/MatMul weight; returns the model and a report.

    Options (onnxprune.options.SparsifyOptions, or its fields as keywords): exactly one of `sparsity` (a
    fraction of each weight's entries zeroed, unstructured) or `pattern` ("2:4": at most 2 non-zero
    weights in every 4 consecutive ones along the reduction axis, the layout sparse tensor cores read:
    see onnxprune.sparsity.masks).

    criterion: "magnitude" (smallest |w| of each layer), "wanda" (smallest |w| * ||x|| of each output,
    needs `calib`) or "sparsegpt" (OBS: zeroes and updates the remaining weights to compensate, layer after
    layer, from each layer's inputs on `calib` in the model sparsified so far, towards the dense model's
    outputs: onnxprune.sparsity.sequential); default sparsegpt with calibration data, else
    magnitude. `calib`: any format `eval` reads (at most `calib_samples` samples);
    `positions_per_sample`: output positions of a Conv sampled per sample for its Gram matrix (None: all).
    `block_size`, `damp`: SparseGPT's lazy-update block and damping (a fraction of mean(diag H)).
    include/exclude: node-name globs or op types, as prune's.

    Loading, validation, the gate (`validate_data`, `max_accuracy_drop`, `metric`, ...), latency and the
    verified atomic save are prune's stages (onnxprune.pipeline.stages); the gate raises
    AccuracyDropError and writes nothing.
    """
    options = SparsifyOptions.build(options, **keywords)

    def run(input_shapes) -> tuple[onnx.ModelProto, SparsifyReport]:
        state = SparsifyState(options, model, output, input_shapes=input_shapes)
        try:
            with sizes_checked_on_failure(state):
                run_stages(state, SPARSIFY)
            return state.working, state.report
        finally:
            if state.staged is not None:
                state.staged.discard()

    return at_sizes_the_dense_model_runs(run)


def check_sparsify_options(state: SparsifyState) -> None:
    o = state.options
    s = o.weights
    state.pattern = _pattern(s.sparsity, s.pattern)
    criterion = s.criterion or ("sparsegpt" if o.calibration.calib is not None else "magnitude")
    if criterion not in CRITERIA:
        raise UsageError(f"criterion (--criterion) '{criterion}': choose one of {', '.join(CRITERIA)}")
    if criterion in NEEDS_CALIBRATION and o.calibration.calib is None:
        raise UsageError(f"criterion {criterion} weighs each weight by its input on calibration data: give some "
                         "(calib / --calib DATA), or use --criterion magnitude")
    if s.distill:
        if o.calibration.calib is None:
            raise UsageError("distillation (--distill) fits the sparsified model to the dense one on calibration "
                             "data: give some (calib / --calib DATA)")
        import onnxprune.autodiff.torch_graph  # noqa: F401  (PyTorch is an extra: say so before any work)
    if s.block_size < 1 or not s.damp > 0:
        raise UsageError(f"block size must be at least 1 and damping above 0; got {s.block_size} and {s.damp}")
    state.options = with_keywords(o, {"criterion": criterion})
    o.calibration.check()
    g, r = o.gate, o.runtime
    state.measure_latency = check_gate_options(g.validate_data, g.max_accuracy_drop, g.metric, r.measure_latency,
                                               r.latency_runs, r.latency_warmup, r.threads, r.provider)
    state.metric = load_metric(g.metric) if isinstance(g.metric, str) else g.metric


def find_weights(state: SparsifyState) -> None:
    s = state.options.weights
    state.selection = find_targets(state.working, state.pattern, list(s.include), list(s.exclude))
    _check_selection(state.selection, s.include, s.exclude)


def gram_matrices(state: SparsifyState) -> None:
    o = state.options
    live = [t for t in state.selection.targets if t.skip is None]
    state.grams, state.samples = _gram_matrices(state.working, live, state.calib_data, o.calibration.calib_samples,
                                                o.weights.positions_per_sample, o.runtime.seed)


def zero_weights(state: SparsifyState) -> None:
    s = state.options.weights
    solver = Solver(state.pattern, s.criterion, s.block_size, s.damp)
    if s.criterion == "sparsegpt":  # calibrated level by level, on the model sparsified so far (sequential.py)
        calib = CalibrationSet.open(state.calib_data, state.working,
                                    max_samples=state.options.calibration.calib_samples)
        replaced, solved = solve_in_levels(state.working, state.selection.targets, solver, calib,
                                           s.positions_per_sample, state.options.runtime.seed)
        state.samples = len(calib)
        state.working, state.layers = _assemble(state.working, state.selection, replaced, solved)
    else:
        state.working, state.layers = _solve(state.working, state.selection, solver, state.grams)
    state.grams = None
    if state.source.value_info:
        infer_shapes(state.working)


def distill_weights(state: SparsifyState) -> None:
    """Fit the kept weights, their biases and the normalisation parameters to the dense model's outputs,
    zeros held (onnxprune.autodiff.distill)."""
    from onnxprune.autodiff.distill import distill, trainable_tensors  # PyTorch: an optional extra

    o = state.options
    inits = {t.name: t for t in state.working.graph.initializer}
    masks = {r.weight: tensor_values(inits[r.weight]) != 0 for r in state.layers
             if r.skipped is None and r.weight in inits}
    biases = [c.bias for t in state.selection.targets if t.skip is None for c in t.readers if c.bias]
    calib = CalibrationSet.open(state.calib_data, state.working, max_samples=o.calibration.calib_samples)
    fitted, state.distillation = distill(state.working, state.dense, calib,
                                         trainable_tensors(state.working, masks, biases),
                                         epochs=o.weights.distill, seed=o.runtime.seed)
    if fitted:
        values = NewValues()
        for name, value in fitted.items():
            values.put(inits[name], value)
        state.working = values.applied_to(state.working)


def build_sparsify_report(state: SparsifyState) -> None:
    s = state.options.weights
    mode = f"{state.pattern}, {s.criterion}" + (f", calibrated on {state.samples} samples" if state.samples else "")
    if state.distillation is not None:
        mode += ", distilled" if state.distillation.kept else ", distillation not kept"
    state.report = SparsifyReport(
        str(state.source.path) if state.source.path else "<ModelProto>",
        str(state.output) if state.output is not None else None, mode, state.layers, state.dense_cost.params,
        state.source.file_size, state.after.file_size, state.samples, checks=state.validation.checks,
        notes=[n for n in [state.input_shapes.note()] if n], timings=state.clock.timings,
        quality=state.quality, latency=state.latency, distillation=state.distillation)


def _file_size(state: SparsifyState) -> None:
    state.report.file_size_after = state.after.file_size


SPARSIFY = [
    Stage("check options", check_sparsify_options, timing="load"),
    Stage("load", load),
    Stage("find weights", find_weights, timing="load"),
    Stage("evaluate dense", evaluate_dense, applies=lambda s: s.validate_data is not None),
    # SparseGPT calibrates as it goes, level by level (zero_weights); Wanda reads the dense model once
    Stage("calibrate", gram_matrices,
          applies=lambda s: s.calib_data is not None and s.options.weights.criterion != "sparsegpt"),
    Stage("sparsify", zero_weights),
    Stage("distill", distill_weights, applies=lambda s: s.options.weights.distill > 0),
    Stage("validate", validate),
    Stage("evaluate sparsified", evaluate_pruned, applies=lambda s: s.dense_ref is not None),
    Stage("latency", measure_latency, applies=lambda s: s.measure_latency),
    Stage("report", build_sparsify_report, timing="save"),
    Stage("gate", gate, timing="save"),
    Stage("save", save),
    Stage("report file size", _file_size, timing="save"),
]


def _pattern(sparsity: float | None, pattern: str | Pattern | None) -> Pattern:
    if (sparsity is None) == (pattern is None):
        raise UsageError("choose one of: a fraction of weights to zero (sparsity / --sparsity 0.5) or an N:M "
                         "pattern (pattern / --pattern 2:4)")
    if pattern is not None:
        return pattern if isinstance(pattern, Pattern) else Pattern.parse(pattern)
    return Pattern.unstructured(sparsity)


def _check_selection(selection: Selection, include, exclude) -> None:
    """Refuse a run that would zero nothing, saying why."""
    if not selection.targets:
        if selection.filtered_out:
            filters = " ".join([f"--include '{p}'" for p in include] + [f"--exclude '{p}'" for p in exclude])
            raise UsageError(f"{filters} leave none of the {selection.filtered_out} Conv/Gemm/MatMul nodes: "
                             "match node names (globs) or op types")
        raise PlanError("nothing to sparsify: the model has no Conv, Gemm or MatMul with a constant float weight "
                        "(a weight computed at run time, or a quantized one, is not sparsified)")
    if all(t.skip is not None for t in selection.targets):
        reasons = "\n  - ".join(f"{t.name}: {t.skip}" for t in selection.targets[:10])
        raise PlanError(f"nothing to sparsify: every weight stays dense:\n  - {reasons}")


def _gram_matrices(model: onnx.ModelProto, targets: list[WeightTarget], data: Any, max_samples: int | None,
                   per_sample: int | None, seed: int) -> tuple[dict, int]:
    """X^T X of every reader's input (onnxprune.calibration.collect_statistics), in passes that hold at
    most GRAM_MEMORY_CAP bytes of accumulators each."""
    calib = CalibrationSet.open(data, model, max_samples=max_samples)
    passes: list[list[GramRequest]] = [[]]
    used = 0
    for t in targets:
        for c in t.readers:
            cost = t.layout.groups * c.in_features ** 2 * 8
            if passes[-1] and used + cost > GRAM_MEMORY_CAP:
                passes.append([])
                used = 0
            passes[-1].append(GramRequest(c))
            used += cost
    grams: dict = {}
    for requests in passes:
        stats = collect_statistics(model, calib, grams=requests, per_sample=per_sample, seed=seed)
        grams.update(stats.grams)
    return grams, len(calib)


def _solve(model: onnx.ModelProto, selection: Selection, solver: Solver, grams: dict | None
           ) -> tuple[onnx.ModelProto, list[LayerResult]]:
    """A new model with every live target's weight replaced by its sparse version (weights read from disk go
    back to a scratch data file as they are made, as prune's slices do), and the per-layer rows."""
    inits = {t.name: t for t in model.graph.initializer}
    replaced = NewValues()
    solved: dict[str, LayerResult] = {}
    for target in progress_iter([t for t in selection.targets if t.skip is None],
                                f"sparsify {len(selection.targets)} weights"):
        w = tensor_values(inits[target.weight])
        try:
            new, row = solver.solve(target, w, grams)
        except np.linalg.LinAlgError as exc:  # a Gram matrix no damping makes positive definite
            solved[target.weight] = _dense_row(target, w, f"SparseGPT failed ({exc}): raise --damp")
            continue
        solved[target.weight] = row
        replaced.put(inits[target.weight], new)
        del w, new
    return _assemble(model, selection, replaced, solved)


def _dense_row(target: WeightTarget, w: np.ndarray, why: str) -> LayerResult:
    zeros = int(np.count_nonzero(w == 0))
    return LayerResult(target.name, target.op_type, target.weight, tuple(w.shape), int(w.size), zeros, zeros,
                       skipped=why)


def _assemble(model: onnx.ModelProto, selection: Selection, replaced: NewValues,
              solved: dict[str, LayerResult]) -> tuple[onnx.ModelProto, list[LayerResult]]:
    """The model with the `replaced` initializers, and a row per target in the selection's order."""
    inits = {t.name: t for t in model.graph.initializer}
    layers = [solved[t.weight] if t.skip is None else _dense_row(t, tensor_values(inits[t.weight]), t.skip)
              for t in selection.targets]
    out = replaced.applied_to(model)
    del out.graph.value_info[:]
    out = ReshareInitializers()(out).model  # copies of shared biases made on load are one tensor again
    return out, layers
