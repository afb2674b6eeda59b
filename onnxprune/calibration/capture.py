"""Capture intermediate activations by exposing them as extra onnxruntime outputs.

The model is never modified: `expose` builds a copy whose graph outputs are
the requested tensors and which keeps only the nodes those tensors need (a
prefix of the network for early layers, so capturing them is cheap).

Memory: a run returns every requested tensor for the whole batch, so the
tensors are split into *chunks* whose activations for one batch fit under a
byte cap (`plan_chunks`); each chunk is one pass over the calibration data.
Nothing is kept across batches except the statistics being accumulated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxprune.ir.graph_view import reads
from onnxprune.ir.editor import rebuilt
from onnxprune.ir.shapes import infer_shapes, skeleton
from onnxprune.runtime.session import make_session

DEFAULT_MEMORY_CAP = 1 << 30  # bytes of captured activations per batch


def needed_nodes(model: onnx.ModelProto, names: Sequence[str], done: set[str] = frozenset()
                 ) -> tuple[list[onnx.NodeProto], list[str]]:
    """The nodes computing `names` (subgraphs' outer-scope reads included), in graph order, walking back
    no further than the nodes named in `done`; and the tensors they read from those (the frontier)."""
    producer = {o: n for n in model.graph.node for o in n.output if o}
    chosen: set[str] = set()
    frontier: dict[str, None] = {}
    seen: set[str] = set()
    stack = list(names)
    while stack:
        t = stack.pop()
        if t in seen:
            continue
        seen.add(t)
        node = producer.get(t)
        if node is None:
            continue  # a graph input or a constant
        if node.name in done:
            frontier[t] = None
        elif node.name not in chosen:
            chosen.add(node.name)
            stack.extend(reads(node))
    return [n for n in model.graph.node if n.name in chosen], list(frontier)


def expose(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of `model` whose outputs are `names` (in that order), without the nodes they do not need.

    Graph inputs are all kept (callers feed every input); initializers only when used.
    """
    wanted = list(dict.fromkeys(names))
    nodes, _ = needed_nodes(model, wanted)
    used = {x for n in nodes for x in reads(n)} | set(wanted)
    old_outputs = {o.name: o for o in model.graph.output}
    return rebuilt(model, node=nodes, initializer=[t for t in model.graph.initializer if t.name in used],
                   output=[old_outputs.get(name) or onnx.ValueInfoProto(name=name) for name in wanted],
                   value_info=[])


def sample_bytes(model: onnx.ModelProto, names: Iterable[str],
                 fixed_inputs: dict[str, list[int]] | None = None) -> dict[str, int | None]:
    """Bytes per sample of each tensor (axis 0 is the batch), None where a dimension is unknown;
    `fixed_inputs`: input shapes of one sample (the calibration data's), which settle the others."""
    shapes = infer_shapes(skeleton(model), fixed_inputs)
    out: dict[str, int | None] = {}
    for name in names:
        entry = shapes.get(name)
        if entry is None or not entry[1]:
            out[name] = None
            continue
        elem, dims = entry
        rest = dims[1:]
        if any(not isinstance(d, int) or d <= 0 for d in rest):
            out[name] = None
            continue
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(elem)).itemsize if elem else 4
        out[name] = int(math.prod(rest)) * itemsize
    return out


@dataclass
class ChunkPlan:
    chunks: list[list[str]]
    batch_size: int


def plan_chunks(per_sample: dict[str, int | None], batch_size: int, memory_cap: int,
                static_batch: int | None = None) -> ChunkPlan:
    """Group tensors (in the given order) so one batch of each chunk fits under `memory_cap`.

    A tensor too large on its own lowers the batch size (unless the model's
    batch is static); a tensor of unknown size gets a chunk of its own.
    """
    known = [b for b in per_sample.values() if b]
    if static_batch is None and known:
        batch_size = max(1, min(batch_size, memory_cap // max(known)))
    elif static_batch is not None:
        batch_size = static_batch
    chunks: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, b in per_sample.items():
        if b is None:
            chunks.append([name])
            continue
        cost = b * batch_size
        if current and used + cost > memory_cap:
            chunks.append(current)
            current, used = [], 0
        current.append(name)
        used += cost
    if current:
        chunks.append(current)
    return ChunkPlan(chunks, batch_size)


def calibration_session(model: onnx.ModelProto, *, threads: int = 0,
                        provider: str = "CPUExecutionProvider") -> ort.InferenceSession:
    """A session for calibration runs. Its threads do not spin-wait between runs: the numpy
    work done between batches (Gram matrices, solves) would otherwise compete with idle
    spinning onnxruntime threads for the same cores."""
    return make_session(model, threads=threads, provider=provider, prepack=False, spinning=False)


class Capture:
    """An onnxruntime session returning `names` of `model` for each batch of feeds."""

    def __init__(self, model: onnx.ModelProto, names: Sequence[str], *, threads: int = 0,
                 provider: str = "CPUExecutionProvider"):
        self.names = list(dict.fromkeys(names))
        proto = expose(model, self.names)
        self.session = calibration_session(proto, threads=threads, provider=provider)
        self._inputs = {i.name for i in self.session.get_inputs()}

    def run(self, feeds: dict[str, np.ndarray], n: int | None = None) -> dict[str, np.ndarray]:
        """Requested tensors for the batch; only the rows of its first `n` samples (padding dropped)."""
        values = self.session.run(self.names, {k: v for k, v in feeds.items() if k in self._inputs})
        fed = max((len(v) for v in feeds.values() if np.ndim(v)), default=0)
        if n is None or n >= fed:
            return dict(zip(self.names, values))
        return {name: first_samples(v, n, fed) for name, v in zip(self.names, values)}


def first_samples(value: np.ndarray, n: int, fed: int) -> np.ndarray:
    """The rows of the first `n` of `fed` samples: a tensor whose axis 0 holds several rows per
    sample (a Gemm reading [batch * tokens, hidden]) keeps n samples' worth of rows, not n rows."""
    rows = value.shape[0] if value.ndim else 0
    if rows and rows % fed == 0:
        return value[:rows // fed * n]
    return value[:n]
