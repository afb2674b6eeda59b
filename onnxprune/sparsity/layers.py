"""Which weights are sparsified, and sparsifying one of them.

A weight is a candidate when every node that reads it is a Conv, Gemm or
MatMul reading it as its constant weight (`onnxprune.calibration.consumers_of`)
in the same layout: zeroing entries of a tensor that a Gather (a tied
embedding), a subgraph or a differently shaped reader also reads would change
those too, with nothing accounting for it. A weight read by several such
consumers (shared layers) is solved once against the sum of their Gram
matrices: the sum of their output errors is what the shared zeros cost.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.calibration.features import Consumer, GramStats, GroupedGramStats, consumers_of
from onnxprune.ir.graph_view import reads
from onnxprune.sparsity.masks import Layout, Pattern, select_mask
from onnxprune.sparsity.sparsegpt import DEFAULT_BLOCK, DEFAULT_DAMP, reconstruction_error, sparsegpt, wanda_scores

CRITERIA = ("magnitude", "wanda", "sparsegpt")
NEEDS_CALIBRATION = ("wanda", "sparsegpt")
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


@dataclass
class WeightTarget:
    """One weight initializer and the consumers that read it."""

    weight: str
    readers: list[Consumer]
    skip: str | None = None  # why it is left dense

    @property
    def layout(self) -> Layout:
        return Layout.of(self.readers[0])

    @property
    def name(self) -> str:
        return " + ".join(c.node for c in self.readers)

    @property
    def op_type(self) -> str:
        return self.readers[0].op_type


@dataclass
class LayerResult:
    """One row of the per-layer table."""

    layer: str
    op_type: str
    weight: str
    shape: tuple[int, ...]
    weights: int
    zeros_before: int
    zeros_after: int
    # relative output error on calibration data: ||X (W - W')^T||^2 / ||X W^T||^2; SparseGPT's is what this
    # layer's zeros add to the error it inherits from the layers sparsified before it (sequential.py)
    error: float | None = None
    skipped: str | None = None
    # SparseGPT: ||X~ W'^T + b' - (X W^T + b)||^2 / ||X W^T + b||^2, the output's whole distance from the dense
    # model's, inherited error included
    output_error: float | None = None

    @property
    def sparsity(self) -> float:
        return self.zeros_after / self.weights if self.weights else 0.0

    def to_dict(self) -> dict:
        return {"layer": self.layer, "op_type": self.op_type, "weight": self.weight, "shape": list(self.shape),
                "weights": self.weights, "zeros_before": self.zeros_before, "zeros_after": self.zeros_after,
                "sparsity": round(self.sparsity, 6), "relative_error": self.error, "output_error": self.output_error,
                "skipped": self.skipped}


def matches(c: Consumer, patterns: list[str] | tuple[str, ...]) -> bool:
    """A node-name glob or an op type, as prune's --include/--exclude."""
    return any(c.op_type == p or fnmatch.fnmatchcase(c.node, p) for p in patterns)


@dataclass
class Selection:
    targets: list[WeightTarget] = field(default_factory=list)
    filtered_out: int = 0  # consumers --include/--exclude left out


def find_targets(model: onnx.ModelProto, pattern: Pattern, include: list[str] | tuple[str, ...] = (),
                 exclude: list[str] | tuple[str, ...] = ()) -> Selection:
    """Every Conv/Gemm/MatMul weight, with a reason where it stays dense."""
    consumers = consumers_of(model)
    inits = {t.name: t for t in model.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in dict.fromkeys(reads(node)):
            readers.setdefault(name, []).append(node)
    by_weight: dict[str, list[Consumer]] = {}
    for c in consumers.values():
        by_weight.setdefault(c.weight, []).append(c)
    selection = Selection()
    for weight, cs in by_weight.items():
        chosen = [c for c in cs if (not include or matches(c, include)) and not (exclude and matches(c, exclude))]
        if not chosen:
            selection.filtered_out += len(cs)
            continue
        target = WeightTarget(weight, cs)
        selection.targets.append(target)
        if len(chosen) < len(cs):
            left = next(c for c in cs if c not in chosen)
            target.skip = f"shared with '{left.node}', which --include/--exclude leave out"
            continue
        others = [n for n in readers.get(weight, []) if n.name not in {c.node for c in cs}]
        if others:
            target.skip = f"also read by {others[0].op_type} '{others[0].name}', which zeros would change too"
            continue
        signature = {(c.op_type, c.weight_shape, c.trans_b, c.group, c.alpha) for c in cs}
        if len(signature) > 1:
            target.skip = "read in different layouts by " + ", ".join(f"{c.op_type} '{c.node}'" for c in cs)
            continue
        if inits[weight].data_type not in FLOAT_TYPES:
            dtype = onnx.TensorProto.DataType.Name(inits[weight].data_type)
            target.skip = f"{dtype} weights: only float16/32/64 weights are sparsified"
            continue
        target.skip = target.layout.fits(pattern)
    return selection


def gram_parts(stats: GramStats | GroupedGramStats) -> list[np.ndarray]:
    """X^T X per group (one for everything but a grouped Conv), in the consumer's feature order."""
    if isinstance(stats, GroupedGramStats):
        return [p.xtx for p in stats.parts]
    return [stats.xtx]


@dataclass
class Solver:
    """How every weight is sparsified: the pattern, the criterion, SparseGPT's settings."""

    pattern: Pattern
    criterion: str
    block_size: int = DEFAULT_BLOCK
    damp: float = DEFAULT_DAMP

    def solve(self, target: WeightTarget, w: np.ndarray, grams: dict | None) -> tuple[np.ndarray, LayerResult]:
        """The sparsified weight (own shape and dtype) and its table row. `grams`: node -> Gram statistics
        of each reader (None without calibration data: magnitude only, no error measured)."""
        layout = target.layout
        matrix = layout.to_blocks(w)
        hessians = None
        if grams is not None:  # readers of a shared weight: the sum of their output errors
            parts = [gram_parts(grams[c.node]) for c in target.readers]
            hessians = [layout.gram_to_blocks(sum(p[i] for p in parts)) for i in range(layout.groups)]
        sparse = self._sparsify(matrix, hessians)
        error = None
        if hessians is not None:
            rows = len(matrix) // layout.groups
            totals = [reconstruction_error(matrix[i * rows:(i + 1) * rows], sparse[i * rows:(i + 1) * rows], h)
                      for i, h in enumerate(hessians)]
            energy = sum(t[1] for t in totals)
            error = sum(t[0] for t in totals) / energy if energy > 0 else None
        out = layout.from_blocks(sparse, w.dtype)
        result = LayerResult(target.name, target.op_type, target.weight, tuple(w.shape), int(w.size),
                             int(np.count_nonzero(w == 0)), int(np.count_nonzero(out == 0)), error)
        return out, result

    def solve_against(self, target: WeightTarget, w: np.ndarray, biases: list[np.ndarray],
                      stats: list[GramStats | GroupedGramStats], refit_bias: bool
                      ) -> tuple[np.ndarray, np.ndarray | None, LayerResult]:
        """SparseGPT against the dense outputs: the sparse weight (own shape and dtype), the refit effective
        bias (None unless `refit_bias`) and the table row.

        stats: per reader, sums of its inputs X~ (from the partly sparsified model) against the dense model's
        outputs Y at the same rows; biases: each reader's effective bias (zeros without one). The weight
        first takes the least-squares fit of Y on X~ (ridge towards the dense weight), then SparseGPT zeroes
        it with X~'s Gram matrix, centred when the bias is refit to absorb the mean shift."""
        layout = target.layout
        groups = layout.groups
        matrix = layout.to_blocks(w)
        rows = len(matrix) // groups
        total = int(round(self.pattern.fraction * matrix.size))
        sparse = np.empty_like(matrix)
        new_bias = np.empty(rows * groups) if refit_bias else None
        drift = after = energy = 0.0
        for g in range(groups):
            out = slice(g * rows, (g + 1) * rows)
            parts = [s.parts[g] if isinstance(s, GroupedGramStats) else s for s in stats]
            n = sum(p.n for p in parts)
            if refit_bias:  # one reader: its sums, centred
                p = parts[0]
                x_mean, y_mean = p.xsum / max(n, 1), p.ysum / max(n, 1)
                h = p.xtx - n * np.outer(x_mean, x_mean)
                c = p.xty - n * np.outer(x_mean, y_mean)
            else:  # the bias stays: X~ W'^T should give Y - b
                h = sum(p.xtx for p in parts)
                c = sum(p.xty - np.outer(p.xsum, b[out]) for p, b in zip(parts, biases))
            h, c = layout.gram_to_blocks(h), c[layout.order]
            # the refit's pull towards the dense weight: a prior worth as many rows as features (128 short
            # texts give MiniLM's 1536-wide Gemm 3 rows per feature, and an unrestrained refit fits their noise)
            lam = max(self.damp, len(h) / max(n, 1)) * max(float(np.mean(np.diag(h))), 1e-12)
            refit = np.linalg.solve(h + lam * np.eye(len(h)), c + lam * matrix[out].T).T
            count = int(round(total * (g + 1) / groups)) - int(round(total * g / groups))
            sparse[out] = sparsegpt(refit, h, self.pattern, block_size=self.block_size, damp=self.damp, count=count)
            for dense_fit, kept in ((refit, False), (sparse[out], True)):
                effective = np.empty_like(dense_fit)
                effective[:, layout.order] = dense_fit
                bias_g = [b[out] for b in biases]
                if refit_bias:
                    bias_g = [y_mean - effective @ x_mean]
                    if kept:
                        new_bias[out] = bias_g[0]
                err = sum(p.squared_error(effective, b) for p, b in zip(parts, bias_g))
                if kept:
                    after += err
                else:
                    drift += err
            energy += sum(p.target_energy for p in parts)
        out_w = layout.from_blocks(sparse, w.dtype)
        result = LayerResult(target.name, target.op_type, target.weight, tuple(w.shape), int(w.size),
                             int(np.count_nonzero(w == 0)), int(np.count_nonzero(out_w == 0)),
                             error=max(after - drift, 0.0) / energy if energy > 0 else None,
                             output_error=after / energy if energy > 0 else None)
        return out_w, new_bias, result

    def _sparsify(self, matrix: np.ndarray, hessians: list[np.ndarray] | None) -> np.ndarray:
        if self.criterion == "magnitude" or self.criterion == "wanda":
            scores = np.abs(matrix)
            if self.criterion == "wanda":
                rows = len(matrix) // len(hessians)
                scores = np.vstack([wanda_scores(matrix[i * rows:(i + 1) * rows], h) for i, h in enumerate(hessians)])
            # Wanda compares the weights of one output with each other (its paper's finding); magnitude
            # compares the whole layer
            mask = select_mask(scores, self.pattern, per_row=self.criterion == "wanda")
            return np.where(mask, 0.0, matrix)
        groups = len(hessians)
        rows = len(matrix) // groups
        total = int(round(self.pattern.fraction * matrix.size))
        out = np.empty_like(matrix)
        for i, h in enumerate(hessians):  # one problem per group of a grouped Conv; counts keep the layer exact
            count = int(round(total * (i + 1) / groups)) - int(round(total * i / groups))
            out[i * rows:(i + 1) * rows] = sparsegpt(matrix[i * rows:(i + 1) * rows], h, self.pattern,
                                                     block_size=self.block_size, damp=self.damp, count=count)
        return out
