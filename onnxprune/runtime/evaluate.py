"""`evaluate()`: run a model (and optionally a reference) over labelled data.

    import onnxprune
    result = onnxprune.evaluate("pruned.onnx", "models/digits_test.npz", reference="models/digits_resnet.onnx")
    print(result.render_table())      # accuracy side by side, then fidelity
    result.accuracy["top1"], result.fidelity["top1_agreement"]

A custom metric is any callable `metric(outputs, labels) -> float | dict[str, float]`
(outputs: the evaluated output for all samples, samples on axis 0; labels:
the data's labels or None); pass one, or a dict name -> callable:

    def mae(outputs, labels):
        return float(abs(outputs[:, 0] - labels).mean())
    onnxprune.evaluate(model, data, metric=mae).custom["mae"]

Batching: a dynamic first axis is fed `batch_size` samples at a time; a
static first axis B is fed exactly B samples (B = 1 loops over samples; a
short last batch is padded by repeating its last sample, and the padding's
outputs are dropped).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import onnx

from onnxprune.errors import DataError, OnnxPruneError
from onnxprune.report import box_table
from onnxprune.runtime.data import Dataset, ImageSpec, InputSpec, model_inputs, open_data
from onnxprune.runtime.metrics import Metric, class_axis, custom_metrics, fidelity, topk_accuracy
from onnxprune.runtime.progress import Progress
from onnxprune.runtime.session import load_for_runtime, make_session

ModelLike = str | os.PathLike | onnx.ModelProto

FIDELITY_LABELS = {  # rendering order
    "top1_agreement": "top-1 agreement",
    "cosine_similarity": "cosine similarity (mean)",
    "max_abs_error": "max |error|",
    "mean_abs_error": "mean |error|",
    "kl_divergence": "KL divergence (ref || model)",
}


@dataclass
class EvalResult:
    model: str
    data: str
    samples: int
    output: str
    batch_size: int
    accuracy: dict[str, float] = field(default_factory=dict)
    custom: dict[str, float] = field(default_factory=dict)
    reference: str | None = None
    reference_accuracy: dict[str, float] = field(default_factory=dict)
    reference_custom: dict[str, float] = field(default_factory=dict)
    fidelity: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "model": self.model, "data": self.data, "samples": self.samples, "output": self.output,
            "batch_size": self.batch_size, "accuracy": self.accuracy, "custom": self.custom,
            "reference": self.reference, "reference_accuracy": self.reference_accuracy,
            "reference_custom": self.reference_custom, "fidelity": self.fidelity, "notes": self.notes,
            "seconds": round(self.seconds, 3),
        }

    def rows(self) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
        ref = self.reference is not None
        header = ("metric", "model", "reference", "change") if ref and (self.reference_accuracy or
                                                                        self.reference_custom) else ("metric", "model")
        rows = []
        for key, value in self.accuracy.items():
            label = f"top-{key[3:]} accuracy"
            if len(header) == 4:
                base = self.reference_accuracy.get(key)
                rows.append((label, _pct(value), _pct(base), f"{(value - base) * 100:+.2f} pt"))
            else:
                rows.append((label, _pct(value)))
        for key, value in self.custom.items():
            if len(header) == 4:
                base = self.reference_custom.get(key)
                rows.append((key, f"{value:.4g}", _num(base), _num(None if base is None else value - base, "+")))
            else:
                rows.append((key, f"{value:.4g}"))
        for key, label in FIDELITY_LABELS.items():
            if key not in self.fidelity:
                continue
            value = self.fidelity[key]
            text = _pct(value) if key == "top1_agreement" else f"{value:.4g}"
            rows.append((f"fidelity: {label}", text, *[""] * (len(header) - 2)))
        return header, rows

    def render_table(self) -> str:
        header, rows = self.rows()
        return box_table(header, rows)

    def render_markdown(self) -> str:
        header, rows = self.rows()
        lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)

    def summary(self) -> str:
        text = f"{self.model} on {self.data}: {self.samples} samples, output '{self.output}', " \
               f"batch {self.batch_size}, {self.seconds:.1f} s."
        return " ".join([text, *self.notes])


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value * 100:.2f}%"


def _num(value: float | None, sign: str = "") -> str:
    return "" if value is None else format(value, sign + ".4g")


def evaluate(
    model: ModelLike,
    data: Any,
    *,
    reference: ModelLike | None = None,
    metric: Metric | Mapping[str, Metric] | None = None,
    batch_size: int = 32,
    output: str | None = None,
    axis: int | None = None,
    provider: str = "CPUExecutionProvider",
    threads: int = 0,
    preprocess: ImageSpec | str | Mapping | None = None,
    tokenizer: Any = None,
    max_length: int | None = None,
    top_k: tuple[int, ...] = (1, 5),
    progress: bool | None = None,
) -> EvalResult:
    """Accuracy of `model` on `data` (top-1/top-5 when there are labels, plus
    `metric`), and its fidelity to `reference` when one is given.

    data: a path (.npz, .npy, image folder, .jsonl: see onnxprune.runtime.data),
    a dict of arrays (labels under "labels"), or a Dataset. output: the output
    to evaluate (default the first); axis: its class axis (default from the
    labels, else 1). threads=0 lets onnxruntime choose. progress: a bar on
    stderr per data pass (None: only when stderr is a terminal).
    """
    if batch_size < 1:
        raise OnnxPruneError(f"batch size must be at least 1, got {batch_size}")
    proto, name = load_for_runtime(model)
    dataset = open_data(data, preprocess=preprocess, tokenizer=tokenizer, max_length=max_length)
    specs = model_inputs(proto)
    dataset.bind(specs)
    out_name = _output_name(proto, output, name)
    labels = dataset.labels
    if labels is None and reference is None and metric is None:
        raise DataError(f"{dataset.source} has no labels and no reference model was given: nothing to measure. "
                        "Add labels (or a class-per-subfolder layout), or compare with --reference")
    if reference is not None:  # read and check the reference before the long runs
        ref_proto, ref_name = load_for_runtime(reference)
        ref_specs = model_inputs(ref_proto)
        _check_same_inputs(specs, ref_specs, ref_name)
        ref_out = out_name if out_name in [o.name for o in ref_proto.graph.output] else \
            _output_name(ref_proto, None, ref_name, index=[o.name for o in proto.graph.output].index(out_name))
    clock = time.perf_counter()
    session = make_session(proto, threads=threads, provider=provider)
    outputs = predict(session, specs, dataset, out_name, batch_size, progress=progress, label=f"{name} on data")
    seconds = time.perf_counter() - clock
    del session
    result = EvalResult(name, dataset.source, len(dataset), out_name, _effective_batch(specs, batch_size),
                        seconds=seconds)
    if labels is not None and labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0):
        labels = labels.astype(np.int64)  # class ids saved as floats
    ids_output = labels is not None and outputs.dtype.kind in "iu" and outputs.shape == labels.shape
    if labels is not None and labels.dtype.kind in "iu":
        if ids_output:  # the model outputs class ids
            result.accuracy = {"top1": float(np.mean(outputs == labels))}
        else:
            try:
                if axis is None:
                    axis = class_axis(outputs.shape, labels.shape, f"output '{out_name}'")
                result.accuracy = topk_accuracy(outputs, labels, axis, top_k, f"output '{out_name}'")
            except DataError as exc:
                if metric is None:
                    raise
                axis = None  # labels meant for the custom metric only
                result.notes.append(f"No top-k accuracy: {exc}.")
    result.custom = custom_metrics(metric, outputs, labels)
    if reference is not None:
        ref_session = make_session(ref_proto, threads=threads, provider=provider)
        ref_outputs = predict(ref_session, ref_specs, dataset, ref_out, batch_size, progress=progress,
                              label=f"{ref_name} on data")
        del ref_session
        result.reference = ref_name
        if result.accuracy and ids_output:
            result.reference_accuracy = {"top1": float(np.mean(ref_outputs == labels))}
        elif result.accuracy:
            result.reference_accuracy = topk_accuracy(ref_outputs, labels, axis, top_k, f"reference '{ref_out}'")
        result.reference_custom = custom_metrics(metric, ref_outputs, labels)
        fid = fidelity(outputs, ref_outputs, axis if axis is not None else class_axis(outputs.shape),
                       f"output '{out_name}'")
        applied = fid.pop("softmax_applied", None)
        if applied is not None:
            result.notes.append("KL divergence on softmax of the outputs (they are not probabilities)."
                                if applied else "KL divergence on the outputs as given (they are probabilities).")
        result.fidelity = fid
    return result


def _output_name(proto: onnx.ModelProto, output: str | None, name: str, index: int = 0) -> str:
    names = [o.name for o in proto.graph.output]
    if output is None:
        if index >= len(names):
            raise DataError(f"{name} has {len(names)} outputs; no output #{index} to compare")
        return names[index]
    if output not in names:
        raise OnnxPruneError(f"'{output}' is not an output of {name}; its outputs are {names}")
    return output


def _check_same_inputs(specs: list[InputSpec], ref_specs: list[InputSpec], ref_name: str) -> None:
    ref = {s.name: s for s in ref_specs}
    if set(ref) != {s.name for s in specs}:
        raise DataError(f"the reference {ref_name} has inputs {sorted(ref)}, the model "
                        f"{sorted(s.name for s in specs)}: fidelity needs the same inputs")
    for s in specs:
        r = ref[s.name]
        same = r.dtype == s.dtype and len(r.shape) == len(s.shape) and all(
            not (isinstance(a, int) and isinstance(b, int)) or a == b for a, b in zip(s.shape[1:], r.shape[1:]))
        if not same:
            raise DataError(f"input '{s.name}': the model expects {s.describe()}, the reference {ref_name} "
                            f"{r.describe()}")


def _effective_batch(specs: list[InputSpec], batch_size: int) -> int:
    static = {s.static_batch for s in specs if s.static_batch is not None}
    if len(static) > 1:
        raise DataError(f"the inputs have different static batch sizes: "
                        f"{ {s.name: s.static_batch for s in specs if s.static_batch} }")
    return static.pop() if static else batch_size


def predict(session, specs: list[InputSpec], dataset: Dataset, output: str, batch_size: int, *,
            progress: bool | None = None, label: str = "data pass") -> np.ndarray:
    """`output` for every sample of a bound dataset, samples on axis 0; `progress`
    shows a bar of samples done on stderr (None: only when stderr is a terminal)."""
    chunk = _effective_batch(specs, batch_size)
    fixed = any(s.static_batch is not None for s in specs)
    n = len(dataset)
    if n == 0:
        raise DataError(f"{dataset.source} holds no samples")
    parts = []
    with Progress(n, label, enabled=progress) as bar:
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            parts.append(_predict_batch(session, specs, dataset, output, chunk, fixed, start, stop))
            bar.update(stop - start)
    return np.concatenate(parts)


def _predict_batch(session, specs, dataset, output, chunk, fixed, start, stop) -> np.ndarray:
    """One batch: samples start..stop-1, a static batch padded to `chunk` and the padding dropped."""
    arrays = dataset.arrays(start, stop)
    feeds = {}
    for s in specs:
        a = np.ascontiguousarray(arrays[s.name], dtype=s.dtype)
        if fixed and len(a) < chunk:
            a = np.concatenate([a, np.repeat(a[-1:], chunk - len(a), axis=0)])
        feeds[s.name] = a
    try:
        (out,) = session.run([output], feeds)
    except Exception as exc:
        raise DataError(f"onnxruntime failed on samples {start}..{stop - 1} of {dataset.source}: {exc}") from exc
    fed = len(next(iter(feeds.values())))
    if out.ndim == 0 or out.shape[0] != fed:
        raise DataError(f"output '{output}' has shape {tuple(out.shape)} for a batch of {fed}: its first axis "
                        "is not the batch axis; evaluate another output with --output")
    return out[:stop - start]
