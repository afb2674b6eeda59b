"""Accuracy on labelled data and fidelity against a reference model: pure functions on arrays.

The class axis of an output is the axis whose removal leaves the labels'
shape, size-1 axes aside (axis 1, else the last axis); without labels it is axis 1 for any
output of rank 2 or more (a [batch, classes] classifier, or NCHW-style dense
predictions), unless given. Outputs of rank 1 have no class axis.

Fidelity (model vs reference, same output, same inputs):

* top1_agreement: share of positions where both argmax over the class axis agree;
* cosine_similarity: mean over samples of the cosine between the flattened outputs;
* max_abs_error / mean_abs_error: over every element;
* kl_divergence: mean over positions of KL(reference || model) along the
  class axis. Outputs that already are probabilities (all in [0, 1], summing
  to 1 along the class axis) are used as they are; otherwise (logits) softmax
  is applied to both first. `fidelity` reports which in "softmax_applied".
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from onnxprune.errors import DataError, OnnxPruneError

Metric = Callable[[np.ndarray, "np.ndarray | None"], "float | Mapping[str, float]"]


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


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def looks_like_probabilities(x: np.ndarray, axis: int, atol: float = 1e-3) -> bool:
    if x.size == 0 or np.any(x < 0) or np.any(x > 1):
        return False
    return bool(np.allclose(np.sum(x, axis=axis, dtype=np.float64), 1.0, atol=atol))


def fidelity(outputs: np.ndarray, reference: np.ndarray, axis: int | None = None,
             name: str = "output") -> dict[str, float]:
    """Closeness of `outputs` to `reference` (see the module docstring)."""
    if outputs.shape != reference.shape:
        raise DataError(f"{name} has shape {tuple(outputs.shape)} but the reference's has {tuple(reference.shape)}; "
                        "fidelity compares outputs of the same shape")
    if axis is None:
        axis = class_axis(outputs.shape)
    a = outputs.astype(np.float64)
    b = reference.astype(np.float64)
    n = a.shape[0] if a.ndim else 1
    diff = np.abs(a - b)
    result = {
        "max_abs_error": float(diff.max()) if diff.size else 0.0,
        "mean_abs_error": float(diff.mean()) if diff.size else 0.0,
    }
    fa, fb = a.reshape(n, -1), b.reshape(n, -1)
    na, nb = np.linalg.norm(fa, axis=1), np.linalg.norm(fb, axis=1)
    dot = np.sum(fa * fb, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((na > 0) & (nb > 0), dot / (na * nb), np.where((na == 0) & (nb == 0), 1.0, 0.0))
    cos = np.where(np.all(fa == fb, axis=1), 1.0, np.clip(cos, -1.0, 1.0))
    result["cosine_similarity"] = float(np.mean(cos)) if cos.size else 1.0
    if axis is not None:
        result["top1_agreement"] = float(np.mean(np.argmax(a, axis=axis) == np.argmax(b, axis=axis)))
        as_probs = looks_like_probabilities(a, axis) and looks_like_probabilities(b, axis)
        p = b if as_probs else softmax(b, axis)
        q = a if as_probs else softmax(a, axis)
        eps = 1e-12
        kl = np.sum(p * (np.log(np.maximum(p, eps)) - np.log(np.maximum(q, eps))), axis=axis)
        result["kl_divergence"] = float(max(np.mean(kl), 0.0))
        result["softmax_applied"] = not as_probs
    return result


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
