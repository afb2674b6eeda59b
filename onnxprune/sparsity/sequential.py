"""SparseGPT layer after layer: each weight solved on the inputs the layers already sparsified give it.

Solving every layer against the dense model's inputs (one calibration pass)
never lets a layer see the error of the layers before it, and on a
transformer those errors add up (MiniLM-L3 at 2:4: 0.898 embedding cosine to
dense that way). Here the weights are solved in *levels* (a consumer's level
is one more than the deepest consumer to sparsify upstream of it;
onnxprune.passes.reconstruct.levels), and the consumers of a level are solved
from a pass of the model whose earlier levels are already sparse:

    X~: the layer's input in the partly sparsified model, Y = X W^T + b: its
    output in the dense model, at the same positions of the same samples.
    min ||X~ W~^T + b~ - Y||^2 over W~ with the pattern's zeros, b~ free
    (asymmetric calibration: the target is the dense output, not the output
    of the dense weight on the shifted input).

Since X~ W*^T + b* (the least-squares fit of Y on X~, ridge towards W)
is orthogonal to its residual, the objective splits into ||Y - X~ W*^T - b*||^2
(upstream drift no weight of this layer could undo) plus
||(X~ - mean) (W* - W~)^T||^2, the SparseGPT problem for W* with the centred
Gram matrix of X~; the bias then takes up the mean shift. A layer without a
bias (MatMul, a bias shared or broadcast) keeps it as it is and the problem is
the same with uncentred sums and Y - b as target.

Both models run incrementally (onnxprune.calibration.incremental): each
level runs only the nodes no level ran before, from the tensors they left,
so the whole walk costs about one pass of each model. When the kept tensors
would pass the memory cap, the level's tensors come from running the model's
prefix instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx

from onnxprune.calibration.capture import Capture, first_samples
from onnxprune.calibration.data import CalibrationSet
from onnxprune.calibration.features import Consumer, GramStats, GroupedGramStats, gram_for, pick_positions, rows
from onnxprune.calibration.incremental import IncrementalCapture
from onnxprune.ir.graph_view import reads, tensor_values
from onnxprune.ir.model_io import NewValues
from onnxprune.passes.reconstruct import levels
from onnxprune.runtime.progress import progress_iter
from onnxprune.sparsity.layers import LayerResult, Solver, WeightTarget

# bytes of Gram sums (X~^T X~ and X~^T Y, float64) held at once: a level's consumers beyond it are summed
# in further replays of the level's kept tensors, which cost no model run
GRAM_MEMORY_CAP = 1 << 30
# activations each model's incremental run may keep (its frontier and the level's tensors)
KEPT_MEMORY_CAP = 1 << 29
BATCH_SIZE = 32


@dataclass
class Bias:
    """A reader's bias as the solve sees it: its values (zeros when there is none) and, when it may be
    refit, the initializer and the factor (Gemm's beta) its values are stored divided by."""

    values: np.ndarray
    initializer: str | None = None
    scale: float = 1.0


def solve_in_levels(model: onnx.ModelProto, targets: list[WeightTarget], solver: Solver, calib: CalibrationSet,
                    per_sample: int | None, seed: int, threads: int = 0, sequential: bool = True
                    ) -> tuple[NewValues, dict[str, LayerResult]]:
    """The new weight and bias values of every live target of `targets` and its table row (by
    weight name). sequential=False takes every input from the dense model (one-pass calibration)."""
    live = [t for t in targets if t.skip is None]
    reader_level = {n: k for k, names in enumerate(levels(model, [c.node for t in live for c in t.readers]))
                    for n in names}
    by_level: dict[int, list[WeightTarget]] = {}
    for t in live:  # a shared weight waits for its deepest reader: all its readers' inputs are known then
        by_level.setdefault(max(reader_level[c.node] for c in t.readers), []).append(t)
    bias_readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in dict.fromkeys(reads(node)):
            bias_readers[name] = bias_readers.get(name, 0) + 1
    inits = {t.name: t for t in model.graph.initializer}
    dense = _Tensors(calib, threads)
    sparse = _Tensors(calib, threads) if sequential else dense
    replaced = NewValues()
    results: dict[str, LayerResult] = {}
    current = model
    for k in progress_iter(sorted(by_level), f"sparsegpt, {len(by_level)} levels of {len(live)} weights"):
        level = by_level[k]
        readers = [c for t in level for c in t.readers]
        inputs = [c.input for c in readers]
        outputs = [c.output for c in readers]
        if sequential:
            current = replaced.applied_to(model)
            sparse.advance(current, inputs)
            dense.advance(model, outputs)
        else:
            dense.advance(model, inputs + outputs)
        for group in _by_memory(level):
            stats = _level_stats([c for t in group for c in t.readers], dense, sparse, per_sample, seed)
            for t in group:
                w = tensor_values(inits[t.weight])
                biases = [_bias_of(c, inits, bias_readers, len(t.readers) == 1) for c in t.readers]
                refit = biases[0] if biases[0].initializer is not None else None
                try:
                    new_w, new_b, row = solver.solve_against(t, w, [b.values for b in biases],
                                                             [stats[c.node] for c in t.readers], refit is not None)
                except np.linalg.LinAlgError as exc:  # a Gram matrix no damping makes positive definite
                    zeros = int(np.count_nonzero(w == 0))
                    results[t.weight] = LayerResult(t.name, t.op_type, t.weight, tuple(w.shape), int(w.size), zeros,
                                                    zeros, skipped=f"SparseGPT failed ({exc}): raise --damp")
                    continue
                results[t.weight] = row
                replaced.put(inits[t.weight], new_w)
                if refit:
                    replaced.put(inits[refit.initializer], new_b / refit.scale)
            del stats
        if sequential:
            sparse.forget([c.node for c in readers])
    return replaced, results


def _bias_of(c: Consumer, inits: dict[str, onnx.TensorProto], readers: dict[str, int], own_weight: bool) -> Bias:
    """The reader's effective bias (Gemm: beta * C), refittable when it is a float per-output vector that
    only this node reads and the weight is this node's alone."""
    outputs = c.out_channels
    if c.bias is None or (c.op_type == "Gemm" and c.beta == 0):
        return Bias(np.zeros(outputs))
    stored = tensor_values(inits[c.bias]).astype(np.float64)
    scale = c.beta if c.op_type == "Gemm" else 1.0
    values = np.broadcast_to(stored.reshape(-1) * scale, (outputs,)).copy()
    if own_weight and readers.get(c.bias) == 1 and stored.size == outputs and stored.dtype.kind == "f" \
            and inits[c.bias].data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                            onnx.TensorProto.DOUBLE):
        return Bias(values, c.bias, scale)
    return Bias(values)


def _by_memory(level: list[WeightTarget]) -> list[list[WeightTarget]]:
    """The level's targets in groups whose Gram sums stay under GRAM_MEMORY_CAP (at least one each)."""
    groups: list[list[WeightTarget]] = [[]]
    used = 0
    for t in level:
        cost = sum(c.group * c.in_features * (c.in_features + c.out_channels // max(c.group, 1)) * 8
                   if c.op_type == "Conv" else c.in_features * (c.in_features + c.out_channels) * 8
                   for c in t.readers)
        if groups[-1] and used + cost > GRAM_MEMORY_CAP:
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += cost
    return groups


def _level_stats(readers: list[Consumer], dense: "_Tensors", sparse: "_Tensors", per_sample: int | None,
                 seed: int) -> dict[str, GramStats | GroupedGramStats]:
    """Per reader: the sums of its partly sparsified inputs X~ against the dense outputs Y, at the same
    sampled positions, padding left out."""
    stats = {c.node: gram_for(c, c.out_channels) for c in readers}
    rngs = {c.node: np.random.default_rng([seed, i]) for i, c in enumerate(readers)}
    for (got_y, valid), (got_x, _) in zip(dense.batches([c.output for c in readers]),
                                          sparse.batches([c.input for c in readers])):
        for c in readers:
            y = got_y[c.output]
            pick = pick_positions(c, y.shape, per_sample, rngs[c.node])
            x_rows, y_rows = rows(c, got_x[c.input], y, pick=pick, valid=valid)
            stats[c.node].update(x_rows, y_rows)
    return stats


class _Tensors:
    """Tensors of a model that changes between levels, batch by batch over the calibration samples: run
    incrementally from what the levels before ran while the kept tensors fit, else from the prefix."""

    def __init__(self, calib: CalibrationSet, threads: int):
        self.calib = calib
        self.threads = threads
        self.runner = IncrementalCapture([calib], BATCH_SIZE, KEPT_MEMORY_CAP, threads)
        self.inputs = {s.name for s in calib.specs}
        self.model: onnx.ModelProto | None = None
        self.resumed = False

    def advance(self, model: onnx.ModelProto, names: list[str]) -> None:
        """Make `names` (of `model`, whose changed weights no earlier advance ran) readable by `batches`."""
        self.model = model
        self.resumed = self.runner.advance(model, [n for n in dict.fromkeys(names) if n not in self.inputs])

    def forget(self, changed: list[str]) -> None:
        """Start the incremental run afresh when a node whose weights changed was already run: the tensors
        kept downstream of it are stale (a shared weight solved after one of its readers ran)."""
        if any(node in self.runner.done for node in changed):
            self.runner = IncrementalCapture([self.calib], BATCH_SIZE, KEPT_MEMORY_CAP, self.threads)

    def batches(self, names: list[str]) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray | None]]:
        """({name: value for the batch's real samples}, their token positions) per batch."""
        names = list(dict.fromkeys(names))
        computed = [n for n in names if n not in self.inputs]
        feeds_iter = self.calib.batches(BATCH_SIZE)
        if self.resumed:
            kept = (got for _, got in self.runner.batches(0, computed))
        else:
            capture = Capture(self.model, computed, threads=self.threads) if computed else None
        for feeds, n in feeds_iter:
            fed = max((len(v) for v in feeds.values() if np.ndim(v)), default=n)
            got = next(kept) if self.resumed else (capture.run(feeds, n) if capture is not None else {})
            got = dict(got)
            got.update((name, first_samples(feeds[name], n, fed)) for name in names if name in self.inputs)
            yield got, self.calib.real_positions(feeds, n)
