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

Batching (`predict`, shared with the prune gate): a dynamic batch axis is
fed `batch_size` samples at a time; a static one of size B is fed exactly B
samples (B = 1 loops over samples; a short last batch is padded by repeating
its last sample, and the padding's outputs are dropped). A model that
computes shapes at run time and refuses a batch (onnxruntime fails, the
samples do not stack, an output loses the batch axis) is fed one sample at a
time, with a note. `batch_axis` says where the model's inputs hold the
samples (1 for a time-major [time, batch, ...] input); the data holds them
first either way, and outputs are compared samples first.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import onnx
import onnxruntime as ort

from onnxprune.errors import DataError, OnnxPruneError
from onnxprune.options import EvalOptions, PruneOptions
from onnxprune.text import box_table
from onnxprune.runtime.data import Dataset, InputSpec, model_inputs, open_data
from onnxprune.runtime.metrics import NO_CLASS_AXIS, Blocks, Metric, blocks_of, class_ids, custom_metrics, \
    fidelity, is_id_output, labelled_accuracy, load_metric, score_axis
from onnxprune.runtime.progress import Progress
from onnxprune.runtime.session import load_for_runtime, make_session, session_source

ModelLike = str | os.PathLike | onnx.ModelProto

FIDELITY_LABELS = {  # rendering order
    "top1_agreement": "top-1 agreement",
    "exact_agreement": "exact agreement",
    "cosine_similarity": "cosine similarity (mean)",
    "relative_l2_error": "relative L2 error",
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
            text = _pct(value) if key.endswith("_agreement") else f"{value:.4g}"
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
    options: EvalOptions | PruneOptions | None = None,
    *,
    reference: ModelLike | None = None,
    metric: Metric | Mapping[str, Metric] | None = None,
    output: str | None = None,
    top_k: tuple[int, ...] = (1, 5),
    **keywords: Any,
) -> EvalResult:
    """Accuracy of `model` on `data` (top-1/top-5 when there are labels, plus
    `metric`), and its fidelity to `reference` when one is given.

    data: a path (.npz, .npy, image folder, .jsonl: see onnxprune.runtime.data),
    a dict of arrays (labels under "labels"), or a Dataset. output: the output
    to evaluate (default the first). metric: a custom metric(outputs, labels)
    or a dict of them (default: the options' `metric` spec, if any).

    options: an EvalOptions (or the PruneOptions a prune ran with), and/or its
    fields as keywords: batch_size, batch_axis (the inputs' axis holding the
    samples), preprocess, tokenizer, max_length, class_axis (the output's
    class axis in the model's layout; default: from the labels, else only a
    [batch, classes] output has one; "none": it holds no class scores),
    provider, threads (0: onnxruntime chooses), progress (a bar on stderr per
    data pass; None: only when stderr is a terminal).
    """
    o = EvalOptions.build(options, **keywords)
    batch_size, batch_axis = o.data.batch_size, o.data.batch_axis
    threads, provider, progress, axis = o.runtime.threads, o.runtime.provider, o.runtime.progress, o.gate.class_axis
    if metric is None and o.gate.metric:
        specs = [o.gate.metric] if isinstance(o.gate.metric, str) else list(o.gate.metric)
        metric = {spec.rpartition(":")[2]: load_metric(spec) for spec in specs}
    if batch_size < 1:
        raise OnnxPruneError(f"batch size must be at least 1, got {batch_size}")
    proto, name = load_for_runtime(model)
    dataset = open_data(data, **o.data.reading())
    specs = bind_data(dataset, model_inputs(proto), batch_axis)
    out_name = _output_name(proto, output, name)
    labels = dataset.labels
    if labels is None and reference is None and metric is None:
        raise DataError(f"{dataset.source} has no labels and no reference model was given: nothing to measure. "
                        "Add labels (or a class-per-subfolder layout), or compare with --reference")
    if reference is not None:  # read and check the reference before the long runs
        ref_proto, ref_name = load_for_runtime(reference)
        ref_specs = [s.samples_first(batch_axis) for s in model_inputs(ref_proto)]
        _check_same_inputs(specs, ref_specs, ref_name)
        ref_out = out_name if out_name in [o.name for o in ref_proto.graph.output] else \
            _output_name(ref_proto, None, ref_name, index=[o.name for o in proto.graph.output].index(out_name))
    clock = time.perf_counter()
    session = make_session(session_source(model, proto), threads=threads, provider=provider)
    out_axis = output_batch_axes(proto, [out_name], batch_axis)
    run = predict(session, specs, dataset, out_name, batch_size, batch_axis=batch_axis, output_axes=out_axis,
                  progress=progress, label=f"{name} on data")
    outputs = run.outputs[out_name]
    seconds = time.perf_counter() - clock
    del session
    result = EvalResult(name, dataset.source, len(dataset), out_name, run.batch_size, seconds=seconds)
    result.notes += [run.note] if run.note else []
    rank = blocks_of(outputs)[0].ndim
    axis = declared_class_axis(axis, out_axis[out_name], rank, f"output '{out_name}'")
    labels = class_ids(labels)
    axis, ids_output = _score_labels(result, outputs, labels, axis, top_k, metric is not None)
    result.custom = custom_metrics(metric, outputs, labels)
    if reference is not None:
        ref_outputs = _reference_outputs(reference, ref_proto, ref_specs, dataset, ref_out, run.batch_size,
                                         batch_axis, threads, provider, progress, ref_name)
        _compare(result, outputs, ref_outputs, labels, axis, ids_output, metric, top_k, ref_name, ref_out, out_name)
    return result


def _score_labels(result: "EvalResult", outputs, labels, axis, top_k, has_metric: bool) -> tuple[Any, bool]:
    """Top-k accuracy against class-id labels into `result`; returns the class axis the labels settled and
    whether the output holds class ids itself. Labels that are not class ids only feed a custom metric."""
    out_name = result.output
    if labels is None:
        return axis, False
    if labels.dtype.kind not in "iu":
        result.notes.append(f"No top-k accuracy: the labels ({labels.dtype}) are not class ids.")
        return axis, False
    try:
        if axis == NO_CLASS_AXIS:
            raise DataError(f"--class-axis {NO_CLASS_AXIS}: output '{out_name}' holds no class scores to "
                            "score the labels with")
        label_axis, result.accuracy = labelled_accuracy(outputs, labels, axis, top_k, f"output '{out_name}'")
        ids_output = is_id_output(outputs, labels)
        return (axis if ids_output else label_axis), ids_output
    except DataError as exc:
        if not has_metric:
            raise
        result.notes.append(f"No top-k accuracy: {exc}.")  # labels meant for the custom metric only
        return axis, False


def _reference_outputs(reference, ref_proto, ref_specs, dataset, ref_out: str, batch_size: int, batch_axis: int,
                       threads: int, provider: str, progress, ref_name: str):
    """The reference model's `ref_out` over the same data, in the same batches."""
    session = make_session(session_source(reference, ref_proto), threads=threads, provider=provider)
    run = predict(session, ref_specs, dataset, ref_out, batch_size, batch_axis=batch_axis,
                  output_axes=output_batch_axes(ref_proto, [ref_out], batch_axis), progress=progress,
                  label=f"{ref_name} on data")
    return run.outputs[ref_out]


def _compare(result: "EvalResult", outputs, ref_outputs, labels, axis, ids_output: bool, metric, top_k,
             ref_name: str, ref_out: str, out_name: str) -> None:
    """The reference's accuracy and custom metrics, and the model's fidelity to it, into `result`."""
    result.reference = ref_name
    if result.accuracy:
        _, result.reference_accuracy = labelled_accuracy(ref_outputs, labels, None if ids_output else axis,
                                                         top_k, f"reference '{ref_out}'")
    result.reference_custom = custom_metrics(metric, ref_outputs, labels)
    fid_axis = axis if result.accuracy and not ids_output else score_axis(outputs, axis)
    fid = fidelity(outputs, ref_outputs, fid_axis, f"output '{out_name}'")
    applied = fid.pop("softmax_applied", None)
    if applied is not None:
        result.notes.append("KL divergence on softmax of the outputs (they are not probabilities)."
                            if applied else "KL divergence on the outputs as given (they are probabilities).")
    result.fidelity = fid


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


@dataclass
class Predictions:
    """A model's outputs over a dataset, samples first: per output one array, or a list of blocks of
    consecutive samples when the shape differs between blocks (onnxprune.runtime.metrics.Blocks)."""

    outputs: dict[str, Blocks]
    batch_size: int  # samples per run as run: 1 once batching failed
    note: str | None = None  # why the samples were fed one at a time


def bind_data(dataset: Dataset, specs: list[InputSpec], batch_axis: int = 0) -> list[InputSpec]:
    """Check `dataset` (samples first) against the model's inputs whose samples lie on `batch_axis`;
    returns the samples-first specs that `predict` takes."""
    data_specs = [s.samples_first(batch_axis) for s in specs]
    dataset.bind(data_specs)
    return data_specs


def output_batch_axes(model: onnx.ModelProto, names: list[str], batch_axis: int = 0) -> dict[str, int]:
    """The axis holding the samples in each output: 0 when the inputs hold them on axis 0; otherwise the
    axis named like the inputs' batch dimension, else `batch_axis` (0 for an output with fewer axes)."""
    if batch_axis == 0:
        return dict.fromkeys(names, 0)
    symbols = {s.shape[batch_axis] for s in model_inputs(model)
               if len(s.shape) > batch_axis and isinstance(s.shape[batch_axis], str)}
    declared = {o.name: o.type.tensor_type for o in model.graph.output}
    axes = {}
    for name in names:
        tensor = declared.get(name)
        dims = [d.dim_param or None for d in tensor.shape.dim] if tensor is not None and tensor.HasField("shape") \
            else None
        named = [i for i, d in enumerate(dims or []) if d in symbols]
        axes[name] = named[0] if named else batch_axis if dims is None or len(dims) > batch_axis else 0
    return axes


def declared_class_axis(axis: int | str | None, batch_axis: int, rank: int, name: str) -> int | str | None:
    """A class axis given in the model's layout (`--class-axis`), numbered as the samples-first outputs
    are; "none" and None pass through."""
    if axis is None or axis == NO_CLASS_AXIS:
        return axis
    axis = int(axis)
    if not -rank <= axis < rank:
        return NO_CLASS_AXIS  # the output has no such axis: not class scores
    axis %= rank
    if axis == batch_axis:
        raise DataError(f"--class-axis {axis} is the axis holding the samples of {name}; give the class axis")
    return axis + 1 if axis < batch_axis else axis


class _BatchFailed(Exception):
    """A batch that did not run as a batch; `error` is what to raise if one sample fails too."""

    def __init__(self, reason: str, error: DataError):
        super().__init__(reason)
        self.reason, self.error = reason, error


_QUIET = ort.RunOptions()
_QUIET.log_severity_level = 4  # a failing batch is retried sample by sample: no error log on stderr


def predict(session, specs: list[InputSpec], dataset: Dataset, outputs: str | list[str], batch_size: int, *,
            batch_axis: int = 0, output_axes: dict[str, int] | None = None, progress: bool | None = None,
            label: str = "data pass", adapt: Callable[[dict], dict] | None = None) -> Predictions:
    """`outputs` (a name or a list) for every sample of a dataset bound with `bind_data` (`specs`: the
    samples-first specs it returned), samples first.

    A dynamic batch axis is fed `batch_size` samples at a time, a static one exactly its size (a short
    last batch padded by repeating its last sample, the padding's outputs dropped). Models whose shapes
    are computed at run time may refuse a batch: when onnxruntime fails on it, its samples do not stack,
    or an output does not hold the batch on its batch axis (`output_axes`, default 0), the samples are fed
    one at a time from there on and `Predictions.note` says why (an output that lacks the samples even
    then is a DataError). `progress` shows a bar of samples done
    on stderr (None: only when stderr is a terminal). `adapt(feeds) -> feeds`: what a model with other
    inputs than the data's takes (a pruned key-value cache: the kept heads of the dense one's)."""
    names = [outputs] if isinstance(outputs, str) else list(outputs)
    axes = output_axes or dict.fromkeys(names, 0)
    chunk = _effective_batch(specs, batch_size)
    fixed = any(s.static_batch is not None for s in specs)
    n = len(dataset)
    if n == 0:
        raise DataError(f"{dataset.source} holds no samples")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    note = None
    with Progress(n, label, enabled=progress) as bar:
        start = 0
        while start < n:
            stop = min(n, start + chunk)
            try:
                got = _predict_batch(session, specs, dataset, names, axes, batch_axis, chunk, fixed, start, stop,
                                     adapt)
            except _BatchFailed as failed:
                if fixed or stop - start == 1:
                    raise failed.error from failed.__cause__
                note = (f"{label}: a batch of {stop - start} samples failed ({failed.reason}), so the samples "
                        "were fed one at a time.")
                chunk = 1
                continue
            for name in names:
                parts[name].append(got[name])
            bar.update(stop - start)
            start = stop
    return Predictions({name: _join(blocks) for name, blocks in parts.items()}, chunk, note)


def _predict_batch(session, specs, dataset, names, axes, batch_axis, chunk, fixed, start, stop, adapt=None) -> dict:
    """One batch: samples start..stop-1, a static batch padded to `chunk` and the padding dropped."""
    try:
        arrays = dataset.arrays(start, stop)
    except DataError:
        raise
    except Exception as exc:  # e.g. samples of different shapes that do not stack
        raise _BatchFailed(f"its samples do not stack: {_first_line(exc)}",
                           DataError(f"cannot read samples {start}..{stop - 1} of {dataset.source}: {exc}")) from exc
    feeds = {}
    for s in specs:
        a = np.ascontiguousarray(arrays[s.name], dtype=s.dtype)
        if fixed and len(a) < chunk:
            a = np.concatenate([a, np.repeat(a[-1:], chunk - len(a), axis=0)])
        feeds[s.name] = a if batch_axis == 0 else np.ascontiguousarray(np.moveaxis(a, 0, batch_axis))
    fed = chunk if fixed else stop - start
    if adapt is not None:
        feeds = adapt(feeds)
    try:
        results = session.run(names, feeds, _QUIET)
    except Exception as exc:
        raise _BatchFailed(
            f"onnxruntime: {_first_line(exc)}",
            DataError(f"onnxruntime failed on samples {start}..{stop - 1} of {dataset.source}: {exc}")) from exc
    out = {}
    for name, value in zip(names, results):
        axis = axes[name]
        if value.ndim <= axis or value.shape[axis] != fed:
            where = "first axis" if axis == 0 else f"axis {axis}"
            raise _BatchFailed(
                f"output '{name}' has shape {tuple(value.shape)}, without the {fed} samples on its {where}",
                DataError(f"output '{name}' has shape {tuple(value.shape)} for a batch of {fed}: its {where} is not "
                          "the batch axis. Give the inputs' batch axis with --batch-axis (the data holds samples "
                          "first), or evaluate another output with --output"))
        value = np.moveaxis(value, axis, 0)
        out[name] = value[:stop - start]
    return out


def _join(blocks: list[np.ndarray]) -> Blocks:
    """One array when every block has the same shape after the samples, else the blocks."""
    if len({(b.shape[1:], b.dtype) for b in blocks}) == 1:
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    return blocks


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """A short reason: the failing node of an onnxruntime error, else the message's first line."""
    text = str(exc).strip()
    node = re.search(r"running (\S+) node\. Name:'([^']*)'", text)
    if node:
        return f"node '{node.group(2)}' ({node.group(1)}) failed"
    text = (text.splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."
