"""SparseGPT: zero weights and update the others so the layer's output on calibration data moves least.

The problem, per layer: given its weight W (outputs x features, block order:
see masks.py) and the Gram matrix H = X^T X of its inputs on calibration data,
find W' with the wanted zeros minimising ||X W^T - X W'^T||^2 = tr(D H D^T),
D = W - W'. Every output row shares the same H, so all rows are solved at once.

Optimal Brain Surgeon: zeroing weight j of a row and moving the remaining ones
by the optimal amount changes them by -w_j / [H^-1]_jj * H^-1[:, j]. SparseGPT
zeroes columns left to right, never revisiting a processed column: after column
j is eliminated, the inverse Hessian of the columns to its right is H^-1 with j
eliminated (one Gaussian elimination step), and the rows of the upper Cholesky
factor U of H^-1 (U^T U = H^-1) are exactly those successive eliminations,
scaled: the update for column j is err_j = w_j / U_jj applied as
W[:, j:] -= err_j * U[j, j:]. Zeroed entries get err = w / U_jj (which makes
them exactly 0), kept entries err = 0. Updates are applied lazily per block of
columns (a rank-`block` update of the columns to the right once per block).

Masks are chosen on the fly from the current (already updated) weights with
the OBS saliency w^2 / U_jj^2: for N:M at the first column of each group of M,
for unstructured sparsity once per block (the lowest of the block over all
rows, counted so the whole layer reaches exactly round(fraction * size)).

H is damped (H + lambda I, lambda = damp * mean(diag H)) so that inputs that
never vary, or fewer calibration rows than features, still give an inverse.
"""
from __future__ import annotations

import numpy as np

from onnxprune.options import SPARSEGPT_BLOCK, SPARSEGPT_DAMP

from onnxprune.sparsity.masks import Pattern, lowest_k, select_mask

DEFAULT_BLOCK = SPARSEGPT_BLOCK
DEFAULT_DAMP = SPARSEGPT_DAMP


def inverse_hessian_factor(h: np.ndarray, damp: float = DEFAULT_DAMP) -> np.ndarray:
    """Upper-triangular U with U^T U = (H + lambda I)^-1. The damping grows tenfold (up to three times)
    when H is too ill-conditioned for a Cholesky factorisation; numpy's LinAlgError if it still fails."""
    h = np.asarray(h, np.float64)
    scale = float(np.mean(np.diag(h)))
    scale = scale if scale > 0 else 1.0
    for attempt in range(4):
        damped = h + np.eye(len(h)) * (damp * scale * 10 ** attempt)
        try:
            h_inv = np.linalg.inv(damped)  # LU: less than half the work of going through triangular solves
            return np.linalg.cholesky((h_inv + h_inv.T) / 2).T  # fails unless positive definite
        except np.linalg.LinAlgError:
            if attempt == 3:
                raise
    raise AssertionError("unreachable")


def sparsegpt(w: np.ndarray, h: np.ndarray, pattern: Pattern, *, block_size: int = DEFAULT_BLOCK,
              damp: float = DEFAULT_DAMP, count: int | None = None) -> np.ndarray:
    """The sparse, updated copy of `w` (outputs x features, block order) for Gram matrix `h`.

    count: how many weights unstructured sparsity zeroes (default round(fraction * size)); the caller
    sets it when a layer is solved in parts (a grouped Conv) so that the layer's total stays exact."""
    w = np.array(w, dtype=np.float64)
    rows, cols = w.shape
    u = inverse_hessian_factor(h, damp)
    m = pattern.m
    if pattern.structured:  # a block never splits an N:M group
        block_size = max(m, block_size - block_size % m)
    target = int(round(pattern.fraction * w.size)) if count is None else int(count)
    zeroed = 0
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block = w[:, start:stop]  # a view: updated in place
        u_block = u[start:stop, start:stop]
        d = np.diag(u_block)
        errors = np.zeros_like(block)
        if pattern.structured:
            mask = np.zeros(block.shape, dtype=bool)
        else:  # cumulative count: rounding per block never drifts from the layer's total
            k = int(round(target * stop / cols)) - zeroed
            mask = lowest_k(np.square(block) / np.square(d), k)
            zeroed += k
        for j in range(stop - start):
            if pattern.structured and j % m == 0:
                mask[:, j:j + m] = select_mask(np.square(block[:, j:j + m]) / np.square(d[j:j + m]), pattern)
            err = np.where(mask[:, j], block[:, j], 0.0) / d[j]
            block[:, j:] -= np.outer(err, u_block[j, j:])
            block[mask[:, j], j] = 0.0  # exactly, not 1e-17
            errors[:, j] = err
        w[:, stop:] -= errors @ u[start:stop, stop:]
    return w


def reconstruction_error(dense: np.ndarray, sparse: np.ndarray, h: np.ndarray) -> tuple[float, float]:
    """(||X D^T||^2, ||X W^T||^2) for D = dense - sparse: the squared output error on the calibration rows
    and the output energy it is relative to."""
    diff = dense - sparse
    return float(((diff @ h) * diff).sum()), float(((dense @ h) * dense).sum())


def wanda_scores(w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """|W_ij| * ||X_j||: a weight matters as much as its magnitude times its input's norm (Wanda)."""
    return np.abs(w) * np.sqrt(np.maximum(np.diag(h), 0.0))[None, :]
