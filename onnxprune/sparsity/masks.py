"""Which individual weights to zero: a sparsity pattern, the reduction-axis layout, and mask selection.

Every function here works on a weight as a matrix W of shape (outputs, features)
whose columns are in *block order*: the reduction axis laid out so that the M
consecutive weights an N:M pattern constrains are M consecutive columns. That
is the layout sparse tensor cores (and TensorRT's sparsity option) read:

* Gemm / MatMul: the reduction axis is K (Gemm's B is (K, N), or (N, K) with
  transB; a MatMul's constant right operand is (K, N)), and blocks are M
  consecutive K at one output.
* Conv: the reduction runs over input channels x kernel positions; blocks are
  M consecutive *input channels* at one output channel and one kernel
  position (TensorRT: "for each output channel and each kernel position,
  every four input channels"). The weight's own (C_in, kh, kw) order is
  channel-major, so block order permutes its columns to kernel-major.

`Layout` converts a node's weight to block order and back; `Pattern` says what
is zeroed; `select_mask` picks the weights to zero from per-weight scores.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from onnxprune.calibration.features import Consumer
from onnxprune.errors import UsageError


@dataclass(frozen=True)
class Pattern:
    """Unstructured (`fraction` of the weights zeroed) or N:M (at most `n` non-zero weights in
    every `m` consecutive weights along the reduction axis: 2:4 zeroes half of them)."""

    fraction: float
    n: int = 0
    m: int = 0

    @classmethod
    def unstructured(cls, fraction: float) -> "Pattern":
        if not 0.0 < fraction < 1.0:
            raise UsageError(f"sparsity (--sparsity) is the fraction of weights zeroed, in (0, 1); got {fraction}")
        return cls(float(fraction))

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        """'2:4' -> keep at most 2 non-zero weights of every 4."""
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
        if match is None:
            raise UsageError(f"pattern (--pattern) '{text}': expected N:M, e.g. 2:4 (at most N non-zero weights in "
                             "every M consecutive ones along the reduction axis)")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise UsageError(f"pattern (--pattern) {n}:{m}: N must be at least 1 and below M (2:4 keeps 2 of every "
                             "4 weights; sparse tensor cores run 2:4)")
        return cls(1.0 - n / m, n, m)

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.fraction:.0%} unstructured"


@dataclass(frozen=True)
class Layout:
    """How a consumer's weight maps to block order, per group of a grouped Conv.

    `order` lists, for each block-order column, the column of the consumer's
    effective weight (`Consumer.effective_weight`, channel-major for Conv) it
    comes from; `block_axis` is the length of the axis N:M blocks run along
    (input channels per group for Conv, K for Gemm/MatMul)."""

    consumer: Consumer
    order: np.ndarray
    block_axis: int

    @classmethod
    def of(cls, c: Consumer) -> "Layout":
        features = c.in_features  # per group for a grouped Conv
        if c.op_type == "Conv":
            channels = int(c.weight_shape[1])
            positions = features // channels
            order = np.arange(features).reshape(channels, positions).T.ravel()  # kernel-major
            return cls(c, order, channels)
        return cls(c, np.arange(features), features)

    @property
    def groups(self) -> int:
        return self.consumer.group if self.consumer.op_type == "Conv" else 1

    def to_blocks(self, w: np.ndarray) -> np.ndarray:
        """The weight as a float64 (outputs, features) matrix in block order."""
        return np.asarray(self.consumer.effective_weight(np.asarray(w, np.float64)))[:, self.order]

    def from_blocks(self, matrix: np.ndarray, dtype) -> np.ndarray:
        """Inverse of `to_blocks`, in the weight's own shape and dtype."""
        effective = np.empty_like(matrix)
        effective[:, self.order] = matrix
        return np.ascontiguousarray(self.consumer.weight_from_effective(effective)).astype(dtype)

    def gram_to_blocks(self, h: np.ndarray) -> np.ndarray:
        return h[np.ix_(self.order, self.order)]

    def fits(self, pattern: Pattern) -> str | None:
        """None when N:M blocks tile the reduction axis, else why not."""
        if pattern.structured and self.block_axis % pattern.m:
            what = "input channels" + (" per group" if self.groups > 1 else "") if self.consumer.op_type == "Conv" \
                else "reduction length (K)"
            return f"{what} {self.block_axis} is not a multiple of {pattern.m}"
        return None


def select_mask(scores: np.ndarray, pattern: Pattern, per_row: bool = False) -> np.ndarray:
    """Boolean mask of the weights to zero: the lowest `scores`.

    N:M: the m - n lowest of every m consecutive columns, per row (columns in
    block order, a multiple of m). Unstructured: round(fraction * size) lowest
    of the whole matrix, or, with `per_row`, round(fraction * columns) of each
    row (Wanda's comparison group: every output keeps the same share).
    """
    rows, cols = scores.shape
    if pattern.structured:
        m = pattern.m
        groups = scores.reshape(rows, cols // m, m)
        lowest = np.argsort(groups, axis=2, kind="stable")[:, :, : m - pattern.n]
        mask = np.zeros(groups.shape, dtype=bool)
        np.put_along_axis(mask, lowest, True, axis=2)
        return mask.reshape(rows, cols)
    if per_row:
        k = int(round(pattern.fraction * cols))
        mask = np.zeros((rows, cols), dtype=bool)
        if k:
            np.put_along_axis(mask, np.argpartition(scores, k - 1, axis=1)[:, :k], True, axis=1)
        return mask
    return lowest_k(scores, int(round(pattern.fraction * scores.size)))


def lowest_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the k lowest entries of `scores` (any shape)."""
    mask = np.zeros(scores.size, dtype=bool)
    if k > 0:
        mask[np.argpartition(scores.ravel(), k - 1)[:k]] = True
    return mask.reshape(scores.shape)


def nm_violations(matrix: np.ndarray, n: int, m: int) -> int:
    """How many blocks of m consecutive columns (per row, block order) hold more than n non-zeros."""
    rows, cols = matrix.shape
    if cols % m:
        raise ValueError(f"{cols} columns do not split into blocks of {m}")
    nonzero = (matrix.reshape(rows, cols // m, m) != 0).sum(axis=2)
    return int((nonzero > n).sum())
