"""`sparsify()`: zero individual weights of Conv/Gemm/MatMul, then validate, gate and save as `prune` does.

    load -> find weights -> Gram matrices (calibration) -> zero + update -> validate -> gate -> save

The model keeps its graph and shapes: only weight values change, so `prune`
then `sparsify` composes (structure first, sparsity inside what remains).
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from onnxprune.calibration.data import CalibrationSet
from onnxprune.calibration.stats import GramRequest, collect_statistics
from onnxprune.cost import model_cost
from onnxprune.errors import PlanError, UsageError
from onnxprune.ir.graph_view import tensor_values
from onnxprune.ir.model_io import EXTERNAL_MIN_BYTES, Spill, copy_fields, is_external, model_byte_size
from onnxprune.ir.prepare import ModelLike, prepare
from onnxprune.ir.shapes import infer_shapes, output_shapes
from onnxprune.passes.cleanup import ReshareInitializers
from onnxprune.runtime.gate import AccuracyDropError, check_gate_options, compare_latency, compare_quality, \
    pruned_outputs, reference_pass
from onnxprune.runtime.inputs import dense_input_shapes
from onnxprune.runtime.output import save_verified, stage_if_on_disk
from onnxprune.runtime.progress import StageClock, progress_iter
from onnxprune.runtime.validate import validate_model
from onnxprune.sparsity.layers import CRITERIA, NEEDS_CALIBRATION, LayerResult, Selection, Solver, WeightTarget, \
    find_targets
from onnxprune.sparsity.masks import Pattern
from onnxprune.sparsity.report import SparsifyReport
from onnxprune.sparsity.sparsegpt import DEFAULT_BLOCK, DEFAULT_DAMP

# Gram accumulators (float64, features^2 each) held per pass over the calibration data: the weights
# are split into passes under this many bytes, so a decoder's 11008-wide MLP gets a pass of its own
GRAM_MEMORY_CAP = 1 << 30


def sparsify(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    sparsity: float | None = None,
    pattern: str | Pattern | None = None,
    criterion: str | None = None,
    calib: Any = None,
    calib_samples: int | None = 128,
    positions_per_sample: int | None = 256,
    include: list[str] | tuple[str, ...] = (),
    exclude: list[str] | tuple[str, ...] = (),
    block_size: int = DEFAULT_BLOCK,
    damp: float = DEFAULT_DAMP,
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
) -> tuple[onnx.ModelProto, SparsifyReport]:
    """Zero individual weights of every Conv/Gemm/MatMul weight; returns the model and a report.

    Exactly one of `sparsity` (a fraction of each weight's entries zeroed, unstructured) or `pattern`
    ("2:4": at most 2 non-zero weights in every 4 consecutive ones along the reduction axis, the layout
    sparse tensor cores read: see onnxprune.sparsity.masks).

    criterion: "magnitude" (smallest |w| of each layer), "wanda" (smallest |w| * ||x|| of each output,
    needs `calib`) or "sparsegpt" (OBS: zeroes and updates the remaining weights to compensate, from the
    Gram matrices of each layer's inputs on `calib`); default sparsegpt with calibration data, else
    magnitude. `calib`: any format `eval` reads (at most `calib_samples` samples);
    `positions_per_sample`: output positions of a Conv sampled per sample for its Gram matrix (None: all).
    `block_size`, `damp`: SparseGPT's lazy-update block and damping (a fraction of mean(diag H)).
    include/exclude: node-name globs or op types, as prune's.

    Validation, the gate (`validate_data`, `max_accuracy_drop`, `metric`, ...), latency and the
    verified atomic save are prune's (see onnxprune.pipeline.prune); the gate raises AccuracyDropError
    and writes nothing.
    """
    chosen = _pattern(sparsity, pattern)
    criterion = criterion or ("sparsegpt" if calib is not None else "magnitude")
    if criterion not in CRITERIA:
        raise UsageError(f"criterion (--criterion) '{criterion}': choose one of {', '.join(CRITERIA)}")
    if criterion in NEEDS_CALIBRATION and calib is None:
        raise UsageError(f"criterion {criterion} weighs each weight by its input on calibration data: give some "
                         "(calib / --calib DATA), or use --criterion magnitude")
    if block_size < 1 or not damp > 0:
        raise UsageError(f"block size must be at least 1 and damping above 0; got {block_size} and {damp}")
    measure_latency = check_gate_options(validate_data, max_accuracy_drop, metric, measure_latency, latency_runs,
                                         latency_warmup, threads, provider)
    clock = StageClock()
    timings, lap = clock.timings, clock.lap

    working, source = prepare(model, output)
    shapes = dense_input_shapes(working, input_shapes, seed)
    fixed = shapes.shapes
    params = model_cost(working, fixed).params
    expected_shapes = output_shapes(working, fixed)
    selection = find_targets(working, chosen, include, exclude)
    _check_selection(selection, include, exclude)
    lap("load")
    dense_ref = None
    if validate_data is not None:  # before the work: data that does not fit fails fast
        dense_ref = reference_pass(working, validate_data, batch_size=batch_size, provider=provider,
                                   progress=progress, metric=metric, batch_axis=batch_axis, class_axis=class_axis)
        lap("evaluate dense")

    live = [t for t in selection.targets if t.skip is None]
    grams, samples = None, None
    if calib is not None:
        grams, samples = _gram_matrices(working, live, calib, calib_samples, positions_per_sample, seed)
        lap("calibrate")
    solver = Solver(chosen, criterion, block_size, damp)
    sparse, layers = _solve(working, selection, solver, grams)
    grams = None
    lap("sparsify")
    if source.value_info:
        infer_shapes(sparse)

    staged = stage_if_on_disk(sparse, output, source)  # a large model is written once, then run from there
    try:
        result = validate_model(sparse, fixed, expected_shapes=expected_shapes, seed=seed,
                                run_from=staged.path if staged is not None else None)
        lap("validate")
        mode = f"{chosen}, {criterion}" + (f", calibrated on {samples} samples" if samples else "")
        report = SparsifyReport(str(source.path) if source.path else "<ModelProto>",
                                str(output) if output is not None else None, mode, layers, params,
                                source.file_size, len(result.serialized or b"") or model_byte_size(sparse),
                                samples, checks=result.checks, notes=[n for n in [shapes.note()] if n],
                                timings=timings)
        runnable = result.serialized or (str(staged.path) if staged is not None else sparse)
        if dense_ref is not None:
            outputs = pruned_outputs(dense_ref, runnable, progress=progress, label="sparsified model on data")
            report.quality = compare_quality(dense_ref, outputs, max_accuracy_drop)
            dense_ref = outputs = None
            lap("evaluate sparsified")
        if measure_latency:
            on_disk = str(staged.path) if staged is not None else sparse
            report.latency = compare_latency(model, on_disk, provider=provider, threads=threads, runs=latency_runs,
                                             warmup=latency_warmup, input_shapes=fixed, progress=progress, seed=seed)
            lap("latency")
        if report.quality is not None and report.quality.passed is False:
            raise AccuracyDropError(f"accuracy gate: {report.quality.verdict()} Nothing was written; sparsify less "
                                    "(a lower --sparsity), use --criterion sparsegpt with --calib, exclude sensitive "
                                    "layers, or raise the budget.", report)
        if staged is not None:  # validation already ran the staged file from disk
            report.file_size_after = staged.commit()
        elif output is not None:
            report.file_size_after = save_verified(sparse, output, result, source=source)
            report.checks.append("read back from disk")
        result.serialized = None
        lap("save")
        return sparse, report
    finally:
        if staged is not None:
            staged.discard()


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
    replaced: dict[str, onnx.TensorProto] = {}
    layers: list[LayerResult] = []
    spill = None
    for target in progress_iter(selection.targets, f"sparsify {len(selection.targets)} weights"):
        tensor = inits[target.weight]
        w = tensor_values(tensor)
        if target.skip is not None:
            layers.append(LayerResult(target.name, target.op_type, target.weight, tuple(w.shape), int(w.size),
                                      int(np.count_nonzero(w == 0)), int(np.count_nonzero(w == 0)),
                                      skipped=target.skip))
            continue
        try:
            new, row = solver.solve(target, w, grams)
        except np.linalg.LinAlgError as exc:  # a Gram matrix no damping makes positive definite
            layers.append(LayerResult(target.name, target.op_type, target.weight, tuple(w.shape), int(w.size),
                                      int(np.count_nonzero(w == 0)), int(np.count_nonzero(w == 0)),
                                      skipped=f"SparseGPT failed ({exc}): raise --damp"))
            continue
        layers.append(row)
        if is_external(tensor) and new.nbytes >= EXTERNAL_MIN_BYTES:
            spill = spill or Spill()
            replaced[target.weight] = spill.add(new, target.weight)
        else:
            replaced[target.weight] = numpy_helper.from_array(new, target.weight)
        del w, new
    # a new ModelProto rather than edits in place: protobuf would keep the dense bytes in the old arena
    out = onnx.ModelProto()
    copy_fields(model, out, skip="graph")
    copy_fields(model.graph, out.graph, skip="initializer")
    del out.graph.value_info[:]
    out.graph.initializer.extend(replaced.get(t.name, t) for t in model.graph.initializer)
    out = ReshareInitializers()(out).model  # copies of shared biases made on load are one tensor again
    return out, layers
