"""Accuracy on labelled data and fidelity against a reference model: pure functions on arrays.

Outputs are held samples first: one array, or a list of blocks of
consecutive samples (`Blocks`) when the shape differs between blocks (a
model fed one sample at a time, sequences padded per batch).

The class axis of an output with labels is the axis whose removal leaves the
labels' shape, size-1 axes aside (axis 1, else the last axis). Without labels
(`score_axis`) an output holds class scores only when declared (an axis
given by the caller), or when it is a float output whose only axis after
the samples longer than 1 is one axis: a [batch, classes] classifier, or
[batch, classes, 1, 1]. Maps, sequences and embeddings with more than one
such axis are not class scores. Outputs of rank 1 have no class axis.

Fidelity (model vs reference, same output, same inputs):

* cosine_similarity: mean over samples of the cosine between the flattened
  outputs of a sample (both zero: 1, one zero: 0); an output with a single
  value per sample (a regressor) has no direction per sample, so the cosine
  is taken over the whole output, all samples as one vector;
* relative_l2_error: ||model - reference|| / ||reference|| over every element;
* max_abs_error / mean_abs_error: over every element;
* with a class axis: top1_agreement, the share of positions where both
  argmax over the class axis agree, and kl_divergence, the mean over
  positions of KL(reference || model) along the class axis. Outputs that
  already are probabilities (all in [0, 1], summing to 1 along the class
  axis) are used as they are; otherwise (logits) softmax is applied to both
  first. `fidelity` reports which in "softmax_applied";
* integer (or boolean) outputs: top1_agreement for one class id per sample
  (an ArgMax at the end), else exact_agreement: the share of equal elements.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence, Union

import numpy as np

from onnxprune.errors import DataError, OnnxPruneError, UsageError

Metric = Callable[[np.ndarray, "np.ndarray | None"], "float | Mapping[str, float]"]
Blocks = Union[np.ndarray, Sequence[np.ndarray]]  # one array, or blocks of consecutive samples (shapes differ)
NO_CLASS_AXIS = "none"  # a declared class axis saying that no output holds class scores


def class_axis(shape: tuple, labels_shape: tuple | None = None, name: str = "output") -> int | None:
    rank = len(shape)
    if rank < 2:
        return None
    if labels_shape is None:
        return 1
    def squeezed(dims) -> tuple:  # [N, 1000, 1, 1] logits fit [N] labels
        return tuple(dims[:1]) + tuple(d for d in dims[1:] if d != 1)

    for axis in dict.fromkeys((1, rank - 1)):
        rest = tuple(shape[:axis]) + tuple(shape[axis + 1:])
        if rest == tuple(labels_shape) or squeezed(rest) == squeezed(labels_shape):
            return axis
    raise DataError(
        f"labels of shape {tuple(labels_shape)} do not fit {name} of shape {tuple(shape)}: expected one class id "
        f"per sample ({shape[:1]}), or per position with the class axis removed"
    )


def _flat_classes(outputs: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(outputs, axis, -1)
    return moved.reshape(-1, moved.shape[-1])


def topk_accuracy(outputs: np.ndarray, labels: np.ndarray, axis: int | None = None, ks: tuple[int, ...] = (1, 5),
                  name: str = "output") -> dict[str, float]:
    """{"top1": .., "top5": ..}; top-k only for k < the number of classes."""
    if not isinstance(outputs, np.ndarray):
        shapes = sorted({tuple(b.shape[1:]) for b in outputs})
        raise DataError(f"{name} has a different shape from one sample to another ({', '.join(map(str, shapes[:3]))}"
                        f"{', ...' if len(shapes) > 3 else ''}); top-k accuracy needs one shape: measure it with a "
                        "custom metric (--metric), which gets the list of blocks")
    labels = np.asarray(labels)
    if labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0):
        labels = labels.astype(np.int64)
    if labels.dtype.kind not in "iu":
        raise DataError(f"labels have dtype {labels.dtype}; top-k accuracy needs integer class ids "
                        "(use a custom metric for other targets)")
    if axis is None:
        axis = class_axis(outputs.shape, labels.shape, name)
    if axis is None:
        raise DataError(f"{name} has shape {tuple(outputs.shape)}: no class axis for top-k accuracy")
    scores = _flat_classes(outputs, axis)
    flat = labels.reshape(-1).astype(np.int64)
    n_classes = scores.shape[1]
    if flat.size != scores.shape[0]:
        raise DataError(f"{flat.size} labels for {scores.shape[0]} predictions of {name} {tuple(outputs.shape)}")
    if flat.size and (flat.min() < 0 or flat.max() >= n_classes):
        raise DataError(f"labels range over {flat.min()}..{flat.max()}, but {name} has {n_classes} classes "
                        f"(axis {axis} of {tuple(outputs.shape)})")
    out = {}
    for k in ks:
        if k == 1:
            out["top1"] = float(np.mean(np.argmax(scores, axis=1) == flat)) if flat.size else float("nan")
        elif k < n_classes:
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
            out[f"top{k}"] = float(np.mean(np.any(top == flat[:, None], axis=1))) if flat.size else float("nan")
    return out


def class_ids(labels: np.ndarray | None) -> np.ndarray | None:
    """Labels as integer class ids when they are whole numbers saved as floats; otherwise as given."""
    if labels is not None and labels.dtype.kind == "f" and np.all(np.mod(labels, 1) == 0):
        return labels.astype(np.int64)
    return labels


def is_id_output(outputs: Blocks, labels: np.ndarray | None) -> bool:
    """Outputs that are class ids (an ArgMax at the end) rather than scores: integers, one per sample
    without labels, or of the labels' shape."""
    if not isinstance(outputs, np.ndarray) or outputs.dtype.kind not in "iu":
        return False
    return outputs.ndim == 1 if labels is None else outputs.shape == labels.shape


def labelled_accuracy(outputs: Blocks, labels: np.ndarray, axis: int | None = None, ks: tuple[int, ...] = (1, 5),
                      name: str = "output") -> tuple[int | None, dict[str, float]]:
    """(class axis used, {"top1": .., "top5": ..}) of `outputs` against integer `labels`; an output of class
    ids scores top-1 by equality (axis None). DataError when the labels are not class ids or do not fit."""
    labels = class_ids(labels)
    if labels.dtype.kind not in "iu":
        raise DataError(f"the labels have dtype {labels.dtype}; accuracy needs integer class ids (use a custom "
                        "--metric for other targets, or drop the labels to measure fidelity to a reference)")
    if is_id_output(outputs, labels):
        return None, {"top1": float(np.mean(outputs == labels))}
    if axis is None and isinstance(outputs, np.ndarray):
        axis = class_axis(outputs.shape, labels.shape, name)
    return axis, topk_accuracy(outputs, labels, axis, ks, name)


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def looks_like_probabilities(x: np.ndarray, axis: int, atol: float = 1e-3) -> bool:
    if x.size == 0 or np.any(x < 0) or np.any(x > 1):
        return False
    return bool(np.allclose(np.sum(x, axis=axis, dtype=np.float64), 1.0, atol=atol))


def score_axis(outputs: Blocks, declared: int | str | None = None) -> int | None:
    """The class axis of an output without labels (axes numbered samples first), or None when it does not
    hold class scores: `declared` "none" says none does, an int is that axis where the output has it;
    otherwise see the module docstring."""
    first = blocks_of(outputs)[0]
    if first.dtype.kind not in "fc" or declared == NO_CLASS_AXIS:
        return None
    if declared is not None:
        return int(declared) if 0 < int(declared) < first.ndim else None
    long_axes = [axis for axis in range(1, first.ndim) if first.shape[axis] > 1]
    return long_axes[0] if len(long_axes) == 1 else None


def blocks_of(outputs: Blocks) -> list[np.ndarray]:
    return [outputs] if isinstance(outputs, np.ndarray) else list(outputs)


def aligned_blocks(outputs: Blocks, reference: Blocks, name: str = "output") -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs of blocks holding the same samples; DataError if the samples' shapes differ."""
    a, b = blocks_of(outputs), blocks_of(reference)
    if [len(x) for x in a] != [len(x) for x in b]:  # blocked differently: compare sample by sample
        a = [x[i:i + 1] for x in a for i in range(len(x))]
        b = [x[i:i + 1] for x in b for i in range(len(x))]
    if len(a) != len(b):
        raise DataError(f"{name} has {sum(len(x) for x in a)} samples but the reference's has "
                        f"{sum(len(x) for x in b)}")
    for x, y in zip(a, b):
        if x.shape != y.shape:
            raise DataError(f"{name} has shape {tuple(x.shape)} but the reference's has {tuple(y.shape)}; "
                            "fidelity compares outputs of the same shape")
    return list(zip(a, b))


def fidelity(outputs: Blocks, reference: Blocks, axis: int | None = None,
             name: str = "output") -> dict[str, float | bool]:
    """Closeness of `outputs` to `reference` (see the module docstring); `axis`: the class axis, if any."""
    pairs = aligned_blocks(outputs, reference, name)
    ids = pairs[0][1].dtype.kind in "iub"
    total = _Totals()
    for a, b in pairs:
        total.add(a, b, None if ids else axis)
    result = {
        "cosine_similarity": total.cosine(),
        "relative_l2_error": total.relative_l2(),
        "max_abs_error": total.max_abs,
        "mean_abs_error": total.sum_abs / total.elements if total.elements else 0.0,
    }
    if ids:
        key = "top1_agreement" if pairs[0][1].ndim == 1 else "exact_agreement"
        equal = sum(int(np.sum(a == b)) for a, b in pairs)
        result[key] = equal / total.elements if total.elements else 1.0
    elif axis is not None:
        result["top1_agreement"] = total.agree / total.positions if total.positions else 1.0
        result["kl_divergence"] = max(total.kl / total.positions, 0.0) if total.positions else 0.0
        result["softmax_applied"] = total.softmax_applied
    return result


class _Totals:
    """Running sums over blocks, so that blocks of different shapes add up to one figure."""

    def __init__(self) -> None:
        self.cosines: list[np.ndarray] = []
        self.single_values = True  # every sample holds one value so far
        self.dot = self.norm_a = self.norm_b = 0.0  # over the whole output
        self.sq_diff = self.sum_abs = self.max_abs = 0.0
        self.elements = 0
        self.agree = self.positions = 0
        self.kl = 0.0
        self.softmax_applied = False

    def add(self, out: np.ndarray, ref: np.ndarray, axis: int | None) -> None:
        a, b = out.astype(np.float64), ref.astype(np.float64)
        n = a.shape[0] if a.ndim else 1
        fa, fb = a.reshape(n, -1), b.reshape(n, -1)
        self.single_values &= fa.shape[1] == 1
        na, nb = np.linalg.norm(fa, axis=1), np.linalg.norm(fb, axis=1)
        dot = np.sum(fa * fb, axis=1)
        self.cosines.append(_cosine(dot, na, nb, np.all(fa == fb, axis=1)))
        self.dot += float(dot.sum())
        self.norm_a += float(np.sum(na ** 2))
        self.norm_b += float(np.sum(nb ** 2))
        diff = np.abs(a - b)
        if diff.size:
            self.max_abs = max(self.max_abs, float(diff.max()))
        self.sum_abs += float(diff.sum())
        self.sq_diff += float(np.sum(diff ** 2))
        self.elements += diff.size
        if axis is None or a.size == 0:
            return
        self.agree += int(np.sum(np.argmax(a, axis=axis) == np.argmax(b, axis=axis)))
        self.positions += a.size // a.shape[axis]
        as_probs = looks_like_probabilities(a, axis) and looks_like_probabilities(b, axis)
        p = b if as_probs else softmax(b, axis)
        q = a if as_probs else softmax(a, axis)
        self.softmax_applied |= not as_probs
        eps = 1e-12
        self.kl += float(np.sum(p * (np.log(np.maximum(p, eps)) - np.log(np.maximum(q, eps)))))

    def cosine(self) -> float:
        if self.single_values:  # one value per sample: the whole output is the vector
            whole = _cosine(np.array([self.dot]), np.array([self.norm_a ** 0.5]), np.array([self.norm_b ** 0.5]),
                            np.array([self.sq_diff == 0.0]))
            return float(whole[0])
        cos = np.concatenate(self.cosines)
        return float(np.mean(cos)) if cos.size else 1.0

    def relative_l2(self) -> float:
        if self.norm_b == 0.0:
            return 0.0 if self.sq_diff == 0.0 else float("inf")
        return (self.sq_diff / self.norm_b) ** 0.5


def _cosine(dot: np.ndarray, na: np.ndarray, nb: np.ndarray, equal: np.ndarray) -> np.ndarray:
    """Per-row cosine; both zero: 1, one zero: 0, identical rows: exactly 1."""
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((na > 0) & (nb > 0), dot / (na * nb), np.where((na == 0) & (nb == 0), 1.0, 0.0))
    return np.where(equal, 1.0, np.clip(cos, -1.0, 1.0))


def custom_metrics(metric: "Metric | Mapping[str, Metric] | None", outputs: np.ndarray,
                   labels: np.ndarray | None) -> dict[str, float]:
    """Run user metrics: a callable(outputs, labels) returning a number (named after the
    callable) or a dict of numbers, or a dict name -> callable."""
    if metric is None:
        return {}
    items = metric.items() if isinstance(metric, Mapping) else [(getattr(metric, "__name__", "metric"), metric)]
    out = {}
    for name, fn in items:
        value = fn(outputs, labels)
        if isinstance(value, Mapping):
            out.update({str(k): float(v) for k, v in value.items()})
        else:
            try:
                out[name] = float(value)
            except (TypeError, ValueError):
                raise OnnxPruneError(f"metric '{name}' returned {type(value).__name__}; return a number or a "
                                     "dict of numbers") from None
    return out


def load_metric(spec: str) -> Callable:
    """'package.module:function' or 'path/to/file.py:function' -> the function (a custom metric)."""
    import importlib
    import importlib.util
    from pathlib import Path

    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr:
        raise UsageError(f"--metric '{spec}': expected MODULE:FUNCTION or FILE.py:FUNCTION")
    try:
        if where.endswith(".py"):
            loader = importlib.util.spec_from_file_location(Path(where).stem, where)
            if loader is None or not Path(where).is_file():
                raise UsageError(f"--metric '{spec}': no such file {where}")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except OnnxPruneError:
        raise
    except Exception as exc:
        raise UsageError(f"--metric '{spec}': cannot import {where} ({type(exc).__name__}: {exc})") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UsageError(f"--metric '{spec}': {where} has no function '{attr}'")
    return fn
