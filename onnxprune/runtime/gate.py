"""The validation gate of `prune` (and the measurements of `sweep`): accuracy or
fidelity on data, and latency, of the dense and the pruned model.

The dense model runs over the data first (`reference_pass`: it fails fast on
data that does not fit, before any pruning work, and only its outputs are
kept); each pruned model is then compared with it (`compare_quality`). Both
feed the data as `eval` does (onnxprune.runtime.evaluate.predict): batches,
or one sample at a time for a model that refuses a batch; `batch_axis` for
inputs that hold the samples elsewhere than on axis 0.

The gated number, `before` for the dense model and `after` for the pruned
one, with drop = before - after and max_drop in the same unit:

* a custom `metric(outputs, labels)` (the first output, samples first; the
  data's labels or None) returning one number, higher is better: that
  number, in its own unit (metric "custom:NAME");
* else data with labels: top-1 accuracy of the first output (metric "top1";
  max_drop=0.02 allows 99.78% -> 97.78%);
* else fidelity to the dense model, for every output, and the worst one is
  gated: before = 1, after = the lowest fidelity over the outputs, so the
  drop is the largest over the outputs of
    - 1 - top-1 agreement for an output of class scores: a float
      [batch, classes] output (or [batch, classes, 1, 1]), or any output
      with the class axis declared (`class_axis`); for an output of class
      ids (integers, one per sample), 1 - the share of equal ids, and for
      other integer outputs 1 - the share of equal elements;
    - 1 - mean cosine similarity (per sample, outputs flattened) for every
      other output: maps, sequences, embeddings, regressors (an output with
      one value per sample: the cosine over all samples). A destroyed model
      has a cosine near 0, a drop near 1; a budget of 0.01 asks for a mean
      cosine of at least 0.99. Cosine ignores scale (use a custom metric
      where the magnitude matters); the relative L2 error is reported beside
      it.
  metric "top1_agreement", "exact_agreement" or "cosine_similarity" when
  every output is gated on the same measure, "fidelity" when they mix.

Per-output fidelity (cosine, relative L2 error, max/mean |error|, top-1
agreement and KL divergence for class scores; onnxprune.runtime.metrics) is
reported in every case. Latency (`compare_latency`) is one interleaved
onnxprune.runtime.bench run of the dense and the pruned model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxprune.errors import AccuracyDropError, DataError, OnnxPruneError, UsageError, ValidationError  # noqa: F401 (AccuracyDropError: re-exported)
from onnxprune.runtime.measures import LatencyStats, QualityStats
from onnxprune.runtime.data import Dataset, InputSpec, model_inputs, open_data
from onnxprune.runtime.evaluate import bind_data, declared_class_axis, output_batch_axes, predict
from onnxprune.runtime.metrics import NO_CLASS_AXIS, Blocks, Metric, aligned_blocks, blocks_of, class_ids, load_metric, \
    custom_metrics, fidelity, labelled_accuracy, score_axis
from onnxprune.runtime.session import check_provider, make_session

ModelLike = str | os.PathLike | onnx.ModelProto
TOP_K = (1, 5)


@dataclass
class DenseReference:
    """The dense model's outputs on the validation data, and what they score."""

    dataset: Dataset
    specs: list[InputSpec]  # samples first, as bound
    batch_axis: int
    output_axes: dict[str, int]  # where each output holds the samples, in the model's layout
    outputs: dict[str, Blocks]  # every tensor output, samples first
    class_axes: dict[str, int | None]  # per output, samples first; None: not class scores
    labels: np.ndarray | None
    accuracy: dict[str, float]  # of the first output, with labels
    custom_metric: Metric | None
    custom: dict[str, float]  # the custom metric on the dense model
    batch_size: int  # as run: 1 when the model refused batches
    provider: str
    threads: int
    notes: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        """The first output: labels and a custom metric are scored on it."""
        return next(iter(self.outputs))

    def gated_key(self, name: str) -> str:
        """The fidelity measure output `name` is gated on."""
        outputs = self.outputs[name]
        if blocks_of(outputs)[0].dtype.kind in "iub":
            return "top1_agreement" if blocks_of(outputs)[0].ndim == 1 else "exact_agreement"
        return "top1_agreement" if self.class_axes[name] is not None else "cosine_similarity"

    @property
    def metric(self) -> str | None:
        """The gated number (see the module docstring); None when no output can be compared."""
        if self.custom_metric is not None:
            return f"custom:{next(iter(self.custom))}"
        if self.accuracy:
            return "top1"
        keys = {self.gated_key(name) for name in self.outputs}
        return None if not keys else keys.pop() if len(keys) == 1 else "fidelity"


def reference_pass(model: onnx.ModelProto, data: Any, *, batch_size: int = 32,
                   provider: str = "CPUExecutionProvider", threads: int = 0, progress: bool | None = None,
                   label: str = "dense model on data", metric: Metric | None = None, batch_axis: int = 0,
                   class_axis: int | str | None = None) -> DenseReference:
    """Run the dense `model` over `data` (a path, dict of arrays or Dataset: see
    onnxprune.runtime.data.open_data); DataError if the data does not fit.

    metric: a custom metric(outputs, labels) -> number, higher is better, to gate on; batch_axis: the
    inputs' axis holding the samples; class_axis: the class axis of the outputs that hold class scores
    (the model's layout; "none": no output does; None: found as the module docstring says)."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    if isinstance(metric, str):  # "FILE.py:FUNCTION" or "module:function"
        metric = load_metric(metric)
    dataset = open_data(data)
    specs = bind_data(dataset, model_inputs(model), batch_axis)
    names = _tensor_outputs(model)
    axes = output_batch_axes(model, names, batch_axis)
    session = make_session(model, threads=threads, provider=provider)
    run = predict(session, specs, dataset, names, batch_size, batch_axis=batch_axis, output_axes=axes,
                  progress=progress, label=label)
    del session
    outputs = run.outputs
    labels = class_ids(dataset.labels)
    first = names[0]
    declared = {name: declared_class_axis(class_axis, axes[name], blocks_of(outputs[name])[0].ndim,
                                          f"output '{name}'") for name in names}
    custom = _custom(metric, outputs[first], labels, "the dense model") if metric is not None else {}
    accuracy: dict[str, float] = {}
    class_axes = {name: score_axis(outputs[name], declared[name]) for name in names}
    notes = [run.note] if run.note else []
    if labels is not None:
        try:
            axis, accuracy = _accuracy(outputs[first], labels, declared[first], f"output '{first}'")
            class_axes[first] = axis if axis is not None else class_axes[first]
        except DataError as exc:
            if metric is None:
                raise
            notes.append(f"No top-k accuracy (the labels are the custom metric's): {exc}.")
    return DenseReference(dataset, specs, batch_axis, axes, outputs, class_axes, labels, accuracy, metric, custom,
                          run.batch_size, provider, threads, notes)


def check_gate_options(validate_data: Any, max_accuracy_drop: float | None, metric: Any,
                       measure_latency: bool | None, latency_runs: int, latency_warmup: int, threads: int,
                       provider: str) -> bool:
    """Refuse gate and latency options that cannot work together, before any work; returns whether
    latency is measured (by default: when there is validation data)."""
    if max_accuracy_drop is not None:
        if validate_data is None:
            raise UsageError("max_accuracy_drop (--max-accuracy-drop) needs validation data "
                             "(validate_data / --validate-data)")
        check_budget(max_accuracy_drop, metric is not None)
    if measure_latency is None:
        measure_latency = validate_data is not None
    if measure_latency and (latency_runs < 1 or latency_warmup < 0 or threads < 0):
        raise UsageError("latency runs must be at least 1, warm-up and threads at least 0")
    if validate_data is not None or measure_latency:
        check_provider(provider)
    return measure_latency


def check_budget(max_drop: float | None, custom_metric: bool = False) -> None:
    """A budget is in the gated number's unit: a fraction in [0, 1], or any number >= 0 for a custom metric."""
    if max_drop is None:
        return
    if custom_metric and not max_drop >= 0.0:
        raise UsageError(f"max_accuracy_drop (--max-accuracy-drop) is the largest fall of the custom metric "
                         f"allowed, at least 0; got {max_drop}")
    if not custom_metric and not 0.0 <= max_drop <= 1.0:
        raise UsageError(f"max_accuracy_drop (--max-accuracy-drop) is a fraction in [0, 1] (0.02 = 2 points of "
                         f"top-1 accuracy or agreement, or a mean cosine of 0.98); got {max_drop}. Only a custom "
                         "--metric takes a budget in its own unit")


def _tensor_outputs(model: onnx.ModelProto) -> list[str]:
    """The outputs that can be compared: tensors (a sequence or map output, e.g. ZipMap's, cannot)."""
    names = [o.name for o in model.graph.output
             if o.type.HasField("tensor_type") and o.type.tensor_type.elem_type != onnx.TensorProto.STRING]
    if not names:
        raise DataError(f"the model's outputs ({', '.join(o.name for o in model.graph.output)}) are not tensors: "
                        "nothing to compare on the validation data")
    return names


def _accuracy(outputs: Blocks, labels: np.ndarray, declared: int | str | None,
              name: str) -> tuple[int | None, dict[str, float]]:
    if labels.dtype.kind not in "iu":
        raise DataError(f"the validation labels have dtype {labels.dtype}; accuracy needs integer class ids "
                        "(drop the labels to gate on fidelity to the dense model, or gate on a custom --metric)")
    if declared == NO_CLASS_AXIS:
        raise DataError(f"--class-axis {NO_CLASS_AXIS}: {name} holds no class scores to score the labels with "
                        "(drop the labels to gate on fidelity to the dense model, or gate on a custom --metric)")
    return labelled_accuracy(outputs, labels, declared, TOP_K, name)


def _custom(metric: Metric, outputs: Blocks, labels: np.ndarray | None, which: str) -> dict[str, float]:
    """The custom metric's one number on `which` model's outputs."""
    name = getattr(metric, "__name__", "metric")
    values = custom_metrics({name: metric}, outputs, labels)
    if len(values) != 1:
        raise OnnxPruneError(f"metric '{name}' returned {len(values)} numbers ({', '.join(values) or 'none'}) for "
                             f"{which}; the gate needs one: return a single number, higher is better")
    return values


def pruned_outputs(reference: DenseReference, model: onnx.ModelProto | bytes, *, progress: bool | None = None,
                   label: str = "pruned model on data", adapt=None) -> dict[str, Blocks]:
    """The pruned model's outputs on the same data (its inputs are the dense model's), fed as the dense
    model was; `adapt(feeds) -> feeds` for a pruned model that takes other inputs (a smaller cache)."""
    session = make_session(model, threads=reference.threads, provider=reference.provider)
    run = predict(session, reference.specs, reference.dataset, list(reference.outputs), reference.batch_size,
                  batch_axis=reference.batch_axis, output_axes=reference.output_axes, progress=progress,
                  label=label, adapt=adapt)
    return run.outputs


def compare_quality(reference: DenseReference, outputs: dict[str, Blocks],
                    max_drop: float | None = None) -> QualityStats:
    """Accuracy (or fidelity, or the custom metric) of the pruned `outputs` against the dense reference."""
    per_output = {}
    for name, dense in reference.outputs.items():
        try:
            aligned_blocks(outputs[name], dense, f"output '{name}'")
        except DataError as exc:
            raise ValidationError(f"on the validation data, the pruned model's {exc} (the dense model's)") from None
        fid = fidelity(outputs[name], dense, reference.class_axes[name], f"output '{name}'")
        fid.pop("softmax_applied", None)
        per_output[name] = fid
    gated = {name: reference.gated_key(name) for name in reference.outputs}
    first = reference.output
    accuracy, custom = {}, {}
    if reference.accuracy:
        _, accuracy = labelled_accuracy(outputs[first], reference.labels, reference.class_axes[first], TOP_K,
                                        f"output '{first}'")
    if reference.custom_metric is not None:
        custom = _custom(reference.custom_metric, outputs[first], reference.labels, "the pruned model")
    metric = reference.metric
    output = first
    if metric is not None and metric.startswith("custom:"):
        before, after = next(iter(reference.custom.values())), next(iter(custom.values()))
    elif metric == "top1":
        before, after = reference.accuracy["top1"], accuracy["top1"]
    else:  # fidelity: the worst output
        output = min(per_output, key=lambda name: per_output[name][gated[name]])
        before, after = 1.0, per_output[output][gated[output]]
    return QualityStats(data=reference.dataset.source, samples=len(reference.dataset), output=output,
                        metric=metric, before=before, after=after, accuracy_before=dict(reference.accuracy),
                        accuracy_after=accuracy, outputs=per_output, gated=gated, max_drop=max_drop,
                        custom_before=dict(reference.custom), custom_after=custom, notes=list(reference.notes))


def compare_latency(dense: ModelLike, pruned: ModelLike, *, provider: str = "CPUExecutionProvider",
                    threads: int = 1, runs: int = 50, warmup: int = 5,
                    input_shapes: dict[str, list[int]] | None = None, progress: bool | None = None,
                    seed: int = 0, pruned_shapes: dict[str, list[int]] | None = None) -> LatencyStats:
    """Median/p90 latency of both models from one interleaved benchmark. pruned_shapes: the pruned model's
    input shapes where they differ from the dense model's (a key-value cache of fewer heads)."""
    from onnxprune.runtime.bench import benchmark

    shapes = input_shapes if pruned_shapes is None else [input_shapes, pruned_shapes]
    result = benchmark([dense, pruned], names=["dense", "pruned"], provider=provider, threads=threads, runs=runs,
                       warmup=warmup, input_shapes=shapes, progress=progress, seed=seed)
    first, second = result.entries
    return LatencyStats(provider, threads, runs, warmup, first.input_shapes, dict(first.latency.__dict__),
                        dict(second.latency.__dict__), result.onnxruntime)
