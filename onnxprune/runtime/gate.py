"""The validation gate of `prune` (and the measurements of `sweep`): accuracy or
fidelity on data, and latency, of the dense and the pruned model.

The dense model runs over the data first (`reference_pass`: it fails fast on
data that does not fit, before any pruning work, and only its outputs are
kept); each pruned model is then compared with it (`compare_quality`):

* data with labels: top-1 (and top-5) accuracy of both; the gated number is
  top-1 accuracy, the drop is dense - pruned in absolute points
  (max_accuracy_drop=0.02 allows 99.78% -> 97.78%);
* data without labels: fidelity to the dense model; the gated number is top-1
  agreement (the share of samples whose top-1 class is the dense model's; 1
  for the dense model itself), so the drop is 1 - agreement.

Always the model's first output, its class axis found as `eval` finds it
(onnxprune.runtime.metrics). Latency (`compare_latency`) is one interleaved
onnxprune.runtime.bench run of the dense and the pruned model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxprune.errors import DataError, ValidationError
from onnxprune.report import LatencyStats, QualityStats
from onnxprune.runtime.data import Dataset, InputSpec, model_inputs, open_data
from onnxprune.runtime.evaluate import predict
from onnxprune.runtime.metrics import class_axis, fidelity, topk_accuracy
from onnxprune.runtime.session import make_session

ModelLike = str | os.PathLike | onnx.ModelProto
TOP_K = (1, 5)


class AccuracyDropError(ValidationError):
    """The pruned model lost more accuracy (or fidelity) than the budget allows;
    nothing was written. `report` holds the full before/after measurements."""

    exit_code = 9

    def __init__(self, message: str, report: Any = None):
        super().__init__(message)
        self.report = report


@dataclass
class DenseReference:
    """The dense model's outputs on the validation data, and what they score."""

    dataset: Dataset
    specs: list[InputSpec]
    output: str
    outputs: np.ndarray
    labels: np.ndarray | None
    axis: int | None
    accuracy: dict[str, float]
    batch_size: int
    provider: str
    threads: int

    @property
    def metric(self) -> str | None:
        """The gated number: "top1" with labels, "top1_agreement" without, None if no class axis."""
        if self.accuracy:
            return "top1"
        if self.axis is not None or _ids(self.outputs, self.labels):
            return "top1_agreement"
        return None


def _ids(outputs: np.ndarray, labels: np.ndarray | None) -> bool:
    """Outputs that are class ids (an ArgMax at the end) rather than scores."""
    if outputs.dtype.kind not in "iu":
        return False
    return labels is None and outputs.ndim == 1 or labels is not None and outputs.shape == labels.shape


def reference_pass(model: onnx.ModelProto, data: Any, *, batch_size: int = 32,
                   provider: str = "CPUExecutionProvider", threads: int = 0, progress: bool | None = None,
                   label: str = "dense model on data") -> DenseReference:
    """Run the dense `model` over `data` (a path, dict of arrays or Dataset: see
    onnxprune.runtime.data.open_data); DataError if the data does not fit."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    dataset = open_data(data)
    specs = model_inputs(model)
    dataset.bind(specs)
    output = model.graph.output[0].name
    session = make_session(model, threads=threads, provider=provider)
    outputs = predict(session, specs, dataset, output, batch_size, progress=progress, label=label)
    del session
    labels = dataset.labels
    if labels is not None and labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0):
        labels = labels.astype(np.int64)  # class ids saved as floats
    axis, accuracy = _accuracy(outputs, labels, f"output '{output}'")
    return DenseReference(dataset, specs, output, outputs, labels, axis, accuracy, batch_size, provider, threads)


def _accuracy(outputs: np.ndarray, labels: np.ndarray | None, name: str) -> tuple[int | None, dict[str, float]]:
    if labels is None:
        return (None if _ids(outputs, None) else class_axis(outputs.shape)), {}
    if labels.dtype.kind not in "iu":
        raise DataError(f"the validation labels have dtype {labels.dtype}; accuracy needs integer class ids "
                        "(drop the labels to gate on fidelity to the dense model instead)")
    if _ids(outputs, labels):
        return None, {"top1": float(np.mean(outputs == labels))}
    axis = class_axis(outputs.shape, labels.shape, name)
    return axis, topk_accuracy(outputs, labels, axis, TOP_K, name)


def pruned_outputs(reference: DenseReference, model: onnx.ModelProto | bytes, *, progress: bool | None = None,
                   label: str = "pruned model on data") -> np.ndarray:
    """The pruned model's outputs on the same data (its inputs are the dense model's)."""
    session = make_session(model, threads=reference.threads, provider=reference.provider)
    return predict(session, reference.specs, reference.dataset, reference.output, reference.batch_size,
                   progress=progress, label=label)


def compare_quality(reference: DenseReference, outputs: np.ndarray, max_drop: float | None = None) -> QualityStats:
    """Accuracy (or fidelity) of the pruned `outputs` against the dense reference."""
    name = f"output '{reference.output}'"
    if outputs.shape != reference.outputs.shape:
        raise ValidationError(f"the pruned model's {name} has shape {tuple(outputs.shape)} on the validation data, "
                              f"the dense model's {tuple(reference.outputs.shape)}")
    accuracy = {}
    if reference.accuracy:
        _, accuracy = _accuracy(outputs, reference.labels, name)
    if _ids(reference.outputs, reference.labels):
        fid = {"top1_agreement": float(np.mean(outputs == reference.outputs))}
    else:
        fid = fidelity(outputs, reference.outputs, reference.axis, name)
        fid.pop("softmax_applied", None)
    metric = reference.metric
    before = after = None
    if metric == "top1":
        before, after = reference.accuracy["top1"], accuracy["top1"]
    elif metric == "top1_agreement":
        before, after = 1.0, fid["top1_agreement"]
    return QualityStats(reference.dataset.source, len(reference.dataset), reference.output, metric, before, after,
                        dict(reference.accuracy), accuracy, fid, max_drop)


def compare_latency(dense: ModelLike, pruned: ModelLike, *, provider: str = "CPUExecutionProvider",
                    threads: int = 1, runs: int = 50, warmup: int = 5,
                    input_shapes: dict[str, list[int]] | None = None, progress: bool | None = None,
                    seed: int = 0) -> LatencyStats:
    """Median/p90 latency of both models from one interleaved benchmark."""
    from onnxprune.runtime.bench import benchmark

    result = benchmark([dense, pruned], names=["dense", "pruned"], provider=provider, threads=threads, runs=runs,
                       warmup=warmup, input_shapes=input_shapes, progress=progress, seed=seed)
    first, second = result.entries
    return LatencyStats(provider, threads, runs, warmup, first.input_shapes, dict(first.latency.__dict__),
                        dict(second.latency.__dict__), result.onnxruntime)
