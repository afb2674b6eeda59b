"""Distillation toward the dense model: a few epochs of gradient descent on the repaired model's weights.

Per-layer repairs (SparseGPT, least squares) fit each layer to the dense one on
its own; they cannot see how errors of earlier layers combine downstream, and on
a small calibration set they fit it too well (MiniLM-L3 at 2:4 on 128 texts:
embedding cosine 0.99 to dense on those texts, 0.89 on others). Distillation
fits the whole model at once: with the zeros held (a mask per weight), the kept
weights, biases and normalisation parameters move to bring every graph output
closer to the dense model's on the calibration data, which needs no labels.

    loss = sum over outputs of ||S - T||^2 / ||T||^2 on real positions (padding excluded)

Adam, the samples shuffled each epoch (`seed`), a fifth of them held out: the
parameters of the epoch with the lowest held-out loss are kept, training stops
after two epochs without improving it, and when no epoch beats the starting
point nothing changes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.autodiff.torch_graph import TorchGraph, torch
from onnxprune.calibration.data import CalibrationSet
from onnxprune.errors import UsageError
from onnxprune.runtime.progress import progress_iter

NORMALIZATION_OPS = ("LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization",
                     "SkipLayerNormalization", "SimplifiedLayerNormalization")
HOLDOUT = 0.2
PATIENCE = 2  # epochs without a better held-out loss before stopping


@dataclass
class DistillResult:
    """What distillation did: held-out losses (relative squared output error) at the start and at the epoch
    kept (0: the start, nothing changed), and the epochs run."""

    held_out_before: float
    held_out_after: float
    best_epoch: int
    epochs_run: int
    trained_tensors: int
    trained_values: int
    samples: int
    seconds: float

    @property
    def kept(self) -> bool:
        return self.best_epoch > 0

    def to_dict(self) -> dict:
        return {**self.__dict__, "kept": self.kept}

    def describe(self) -> str:
        what = (f"Distillation: {self.trained_tensors} tensors ({self.trained_values:,} values) fitted to the dense "
                f"model's outputs on {self.samples} samples, {self.epochs_run} epochs in {self.seconds:.0f} s; "
                f"held-out output error {self.held_out_before:.4f}")
        if self.kept:
            return what + f" -> {self.held_out_after:.4f} (epoch {self.best_epoch} kept)."
        return what + ", no epoch lowered it: the weights are kept as they were."


def trainable_tensors(model: onnx.ModelProto, weights: dict[str, np.ndarray], biases: list[str]
                      ) -> dict[str, np.ndarray | None]:
    """What distillation may move: `weights` (name -> bool mask of the entries that may be non-zero), the
    `biases`, and the scale and shift of every normalisation node (float initializers only)."""
    floats = {t.name for t in model.graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)}
    out: dict[str, np.ndarray | None] = {n: m for n, m in weights.items() if n in floats}
    out.update((b, None) for b in biases if b in floats and b not in out)
    for node in model.graph.node:
        if node.op_type in NORMALIZATION_OPS:
            for name in node.input[1:3]:
                if name in floats and name not in out:
                    out[name] = None
    return out


def distill(student: onnx.ModelProto, teacher: onnx.ModelProto, calib: CalibrationSet,
            trainable: dict[str, np.ndarray | None], *, epochs: int = 4, lr: float = 1e-4, batch_size: int = 16,
            seed: int = 0, threads: int = 0) -> tuple[dict[str, np.ndarray], DistillResult]:
    """New values (float32) for the `trainable` initializers of `student` (name -> mask of the entries that
    may be non-zero, None: all), fitted to `teacher`'s outputs on `calib`; {} when no epoch improved the held-out
    loss. Both models have the same inputs and outputs."""
    if epochs < 1 or not lr > 0 or batch_size < 1:
        raise UsageError(f"distillation needs at least one epoch, a positive learning rate and batch size; got "
                         f"{epochs}, {lr}, {batch_size}")
    if threads:
        torch.set_num_threads(threads)
    clock = time.perf_counter()
    fit, held = calib.split(HOLDOUT, seed)
    if len(held) == 0:
        fit = held = calib  # too few samples to hold any out: judge on the fitted ones
    outputs = [o.name for o in teacher.graph.output]
    graph = TorchGraph(student, trainable)
    masks = {name: torch.from_numpy(np.asarray(m, bool)) for name, m in trainable.items() if m is not None}
    fit_batches = _with_targets(teacher, fit, outputs)
    held_batches = _with_targets(teacher, held, outputs)

    def held_out_loss() -> float:
        with torch.no_grad():
            return float(sum(_loss(graph(feeds, outputs), n, targets, valid) for feeds, n, targets, valid in held_batches)
                         / max(1, len(held_batches)))

    params = list(graph.parameters.values())
    optimizer = torch.optim.Adam(params, lr=lr)
    start = best = held_out_loss()
    best_state = None
    best_epoch = epochs_run = 0
    rng = np.random.default_rng(seed)
    step = max(1, batch_size // max(1, _batch_of(fit_batches)))  # fed batches per optimiser step
    for epoch in progress_iter(range(1, epochs + 1), f"distill {len(params)} tensors, {len(fit)} samples"):
        order = rng.permutation(len(fit_batches))
        for first in range(0, len(order), step):
            optimizer.zero_grad()
            chunk = order[first:first + step]
            for i in chunk:
                feeds, n, targets, valid = fit_batches[i]
                (_loss(graph(feeds, outputs), n, targets, valid) / len(chunk)).backward()
            with torch.no_grad():
                for name, mask in masks.items():  # a zero stays zero: no gradient, no Adam step
                    graph.parameters[name].grad.mul_(mask)
            optimizer.step()
            with torch.no_grad():
                for name, mask in masks.items():
                    graph.parameters[name].mul_(mask)
        epochs_run = epoch
        loss = held_out_loss()
        if loss < best:
            best, best_epoch = loss, epoch
            best_state = {n: p.detach().clone() for n, p in graph.parameters.items()}
        elif epoch - best_epoch >= PATIENCE:
            break
    result = DistillResult(start, best, best_epoch, epochs_run, len(params), int(sum(p.numel() for p in params)),
                           len(calib), time.perf_counter() - clock)
    if best_state is None:
        return {}, result
    return {n: v.numpy() for n, v in best_state.items()}, result


def _batch_of(batches: list) -> int:
    """Real samples in a fed batch (1 for a model whose batch size is fixed at 1)."""
    return batches[0][1] if batches else 1


def _with_targets(teacher: onnx.ModelProto, calib: CalibrationSet, outputs: list[str]) -> list[tuple]:
    """(feeds, real samples n, the teacher's outputs for them, their real positions or None) per fed batch;
    the targets are computed once, by onnxruntime."""
    from onnxprune.runtime.session import make_session

    session = make_session(teacher, threads=0)
    out = []
    for feeds, n in calib.batches(16):  # a static batch comes padded by repetition: only n rows are real
        got = session.run(outputs, feeds)
        valid = calib.real_positions(feeds, n)
        out.append((feeds, n, [torch.from_numpy(np.asarray(g[:n], np.float32)) for g in got],
                    None if valid is None else torch.from_numpy(np.asarray(valid, bool))))
    return out


def _loss(got: dict, n: int, targets: list, valid) -> "torch.Tensor":
    """Sum over outputs of the relative squared error, on the real positions where the output's leading
    axes are (batch, sequence) or (batch,)."""
    total = 0.0
    for value, target in zip(got.values(), targets):
        value = value[:n].float()
        if valid is not None and tuple(value.shape[:valid.dim()]) == tuple(valid.shape):
            weight = valid.reshape(tuple(valid.shape) + (1,) * (value.dim() - valid.dim())).float()
            diff, ref = (value - target) * weight, target * weight
        else:
            diff, ref = value - target, target
        total = total + (diff ** 2).sum() / (ref ** 2).sum().clamp_min(1e-12)
    return total
