"""Padded positions never enter a statistic or a fit.

Text models are fed sequences padded to a common length with an attention
mask saying which positions are tokens (1) and which are padding (0): a
calibration set of 48 real tokens in 128 would otherwise be three-quarters
padding, and every mean, variance, Gram matrix and least-squares fit would
learn what the model does on padding. The mask input is found by name (a
[batch, sequence] input whose name contains "mask", as the text reader fills
it, or an additive [batch, 1, 1, sequence] one) or named by the user (`--mask-input`); a tensor's rows are matched to token
positions by shape: [batch, sequence, ...] or [batch * sequence, ...] (a
Gemm on flattened tokens). Tensors of any other layout (an attention score
map, a convolution) are used whole.
"""
from __future__ import annotations

import numpy as np

from onnxprune.errors import DataError


def find_mask_input(specs, named: str | None = None) -> str | None:
    """The attention-mask input of a model: `named`, else the one input whose name says "mask" and whose
    shape is [batch, sequence] (integers, or floats: 1/0 or additive 0/-large), or [batch, 1, 1, sequence]
    (an additive mask broadcast over heads and queries, as some exporters take it)."""
    if named is not None:
        if named not in {s.name for s in specs}:
            raise DataError(f"--mask-input '{named}' is not an input of the model "
                            f"(inputs: {', '.join(s.name for s in specs)})")
        return named
    found = [s.name for s in specs if "mask" in s.name.lower() and _mask_shaped(s)]
    return found[0] if len(found) == 1 else None


def _mask_shaped(spec) -> bool:
    shape = list(spec.shape)
    if spec.dtype.kind not in "iubf":
        return False
    if len(shape) == 2:
        return True
    return spec.dtype.kind == "f" and len(shape) == 4 and shape[1] == 1 and shape[2] == 1


def real_positions(feeds: dict[str, np.ndarray], n: int, mask_input: str | None) -> np.ndarray | None:
    """bool [n, sequence]: which positions of the batch's first n samples are tokens (None: no mask).
    A float mask without ones is additive (0 for a token, a large negative number for padding);
    otherwise non-zero marks a token."""
    if mask_input is None or mask_input not in feeds:
        return None
    values = np.asarray(feeds[mask_input][:n])
    if values.ndim != 2:
        if values.ndim < 2 or int(np.prod(values.shape[1:-1])) != 1:
            return None  # a per-query mask (causal, [batch, 1, seq, seq]) does not say which tokens are padding
        values = values.reshape(values.shape[0], values.shape[-1])
    # every sample has a token, so a 1/0 mask holds a 1: a float mask without one is additive
    additive = values.dtype.kind == "f" and not bool((values > 0.5).any())
    valid = values > -1.0 if additive else values != 0
    return None if valid.all() else valid


def row_mask(x_shape: tuple[int, ...], valid: np.ndarray | None, rows_per_sample: bool) -> np.ndarray | None:
    """For a tensor of `x_shape`, which of its leading positions are real, or None (all, or no match).

    rows_per_sample: the leading axis holds samples and axis 1 the sequence ([batch, sequence, ...]);
    otherwise the leading axis holds batch * sequence rows ([tokens, features])."""
    if valid is None or len(x_shape) < 2:
        return None
    if rows_per_sample and tuple(x_shape[:2]) == valid.shape:
        return valid
    if not rows_per_sample and x_shape[0] == valid.size:
        return valid.reshape(-1)
    return None


def real_part(x: np.ndarray, axis: int, valid: np.ndarray | None) -> tuple[np.ndarray, int]:
    """`x` without its padded positions, and where its channel `axis` is then: [batch, sequence, ...]
    with the channel axis after them becomes [tokens, ...]; [batch * sequence, C] keeps its real rows."""
    axis = axis % x.ndim
    keep = row_mask(x.shape, valid, rows_per_sample=True)
    if keep is not None and axis >= 2:
        return x[keep], axis - 1
    keep = row_mask(x.shape, valid, rows_per_sample=False)
    if keep is not None and axis >= 1:
        return x[keep], axis
    return x, axis
