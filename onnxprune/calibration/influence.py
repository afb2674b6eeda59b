"""Block influence: how much a residual block or layer changes the stream it sits on.

    BI = 1 - mean over positions of cos(x, y)

where x is the unit's input, y its output, and positions are tokens (the
features are the last axis) or pixels (the channels are axis 1) of every
sample (ShortGPT, Men et al. 2024). A unit whose output points where its
input did contributes little: it is the first to drop.

Inputs and outputs are captured as extra onnxruntime outputs
(`calibration.capture`), streamed batch by batch: only running sums are kept.
Units are split into passes so that one batch of their tensors fits under the
memory cap.

Without calibration data, random inputs of the right shapes stand in (token
ids drawn below the embedding table's size, masks set to 1, floats from a
standard normal): enough to rank blocks by how much they change *some* input,
and the report says so.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from onnxprune.calibration.capture import DEFAULT_MEMORY_CAP, Capture, sample_bytes
from onnxprune.calibration.data import CalibrationSet

RANDOM_SAMPLES = 8


@dataclass
class InfluenceResult:
    scores: list[float]        # one per unit, in the order given
    samples: int
    positions: int             # positions averaged per unit (tokens or pixels over all samples)
    source: str                # where the inputs came from, for the report

    def describe(self) -> str:
        return f"block influence = 1 - mean cosine(input, output) over {self.positions} positions of {self.source}"


def feature_cosines(x: np.ndarray, y: np.ndarray, axis: int) -> np.ndarray:
    """Cosine similarity of x and y along `axis`, one value per other position (token, pixel).

    Two all-zero vectors are identical (1); a zero vector against a non-zero one is 0.
    """
    a = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    b = np.moveaxis(np.asarray(y, dtype=np.float64), axis, -1)
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    dot = np.einsum("ij,ij->i", a, b)
    na = np.sqrt(np.einsum("ij,ij->i", a, a))
    nb = np.sqrt(np.einsum("ij,ij->i", b, b))
    denom = na * nb
    both_zero = (na == 0) & (nb == 0)
    return np.where(denom > 0, dot / np.where(denom > 0, denom, 1.0), np.where(both_zero, 1.0, 0.0))


def block_influence(model: onnx.ModelProto, units: Sequence, data: Any = None, *,
                    max_samples: int | None = 512, batch_size: int = 32,
                    input_shapes: dict[str, list[int]] | None = None, seed: int = 0,
                    random_samples: int = RANDOM_SAMPLES, memory_cap: int = DEFAULT_MEMORY_CAP,
                    threads: int = 0) -> InfluenceResult:
    """Block influence of each unit (`.input`, `.output`, `.feature_axis`) on `data`
    (calibration data in any format `eval` reads) or, when None, on random inputs."""
    if data is not None:
        calib = CalibrationSet.open(data, model, max_samples=max_samples)
        samples = len(calib)
        source = f"{samples} calibration sample(s) from {calib.source}"

        def batches(bs: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
            return calib.batches(bs)
        static = calib.static_batch()
    else:
        samples = random_samples
        source = (f"{samples} random input(s) (no calibration data: pass --calib for a ranking on real inputs)")
        static = _static_batch(model)

        def batches(bs: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
            return random_batches(model, samples, input_shapes or {}, seed, static or bs)
    sums = np.zeros(len(units))
    counts = np.zeros(len(units), dtype=np.int64)
    for chunk, bs in _chunks(model, units, batch_size, memory_cap, static):
        names = [t for k in chunk for t in (units[k].input, units[k].output)]
        capture = Capture(model, names, threads=threads)
        for feeds, n in batches(bs):
            values = capture.run(feeds, n)
            for k in chunk:
                u = units[k]
                cos = feature_cosines(values[u.input], values[u.output], u.feature_axis)
                sums[k] += cos.sum()
                counts[k] += cos.size
        del capture
    scores = [float(1.0 - s / c) if c else float("nan") for s, c in zip(sums, counts)]
    return InfluenceResult(scores, samples, int(counts.max()) if len(counts) else 0, source)


def _chunks(model, units, batch_size, cap, static) -> list[tuple[list[int], int]]:
    """Units per pass, and the batch size, so that a batch of a pass's tensors stays under `cap`."""
    per = sample_bytes(model, {t for u in units for t in (u.input, u.output)})
    cost = [(per.get(u.input) or 0) + (per.get(u.output) or 0) for u in units]
    bs = static or max(1, min(batch_size, cap // max(max(cost, default=1), 1)))
    out: list[tuple[list[int], int]] = []
    current: list[int] = []
    used = 0
    for k, c in enumerate(cost):
        if current and used + c * bs > cap:
            out.append((current, bs))
            current, used = [], 0
        current.append(k)
        used += c * bs
    if current:
        out.append((current, bs))
    return out


def _static_batch(model: onnx.ModelProto) -> int | None:
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return int(dims[0].dim_value)
    return None


def _id_ranges(model: onnx.ModelProto) -> dict[str, int]:
    """Integer inputs read as indices of a constant table (token or position ids): the table's size."""
    tables = {t.name: list(t.dims) for t in model.graph.initializer}
    out: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[0] in tables:
            axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
            dims = tables[node.input[0]]
            if dims:
                size = int(dims[axis])
                out[node.input[1]] = min(out.get(node.input[1], size), size)
    return out


def random_batches(model: onnx.ModelProto, samples: int, shapes: dict[str, list[int]], seed: int,
                   batch: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """`samples` random samples in batches: ids below their table's size, other integers 1 (masks)."""
    from onnxprune.runtime.inputs import concrete_input_shapes

    fixed = concrete_input_shapes(model, shapes)
    ranges = _id_ranges(model)
    rng = np.random.default_rng(seed)
    done = 0
    while done < samples:
        n = min(batch, samples - done)
        feeds = {}
        for vi in model.graph.input:
            dims = vi.type.tensor_type.shape.dim
            shape = list(fixed[vi.name])
            static = bool(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0
            rows = shape[0] if static else n  # a dynamic batch takes the samples; other dims as given
            shape[0:1] = [rows] if shape else []
            dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            if dtype.kind == "f":
                feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
            elif vi.name in ranges:
                feeds[vi.name] = rng.integers(0, ranges[vi.name], shape).astype(dtype)
            elif dtype.kind == "b":
                feeds[vi.name] = np.ones(shape, dtype=bool)
            else:
                feeds[vi.name] = np.ones(shape, dtype=dtype)
        yield feeds, min(n, feeds[next(iter(feeds))].shape[0]) if feeds else n
        done += n
