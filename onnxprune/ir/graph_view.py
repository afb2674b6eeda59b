"""A read-only index over a ModelProto: producers, consumers, constants, shapes.

Analysis and cost passes read the graph through this view; they never copy
weights.  Constant values are decoded lazily and cached.

Control flow (If, Loop, Scan): a subgraph may read any tensor of the enclosing
graphs by name without listing it as an input.  `reads(node)` is what a node
reads, explicitly or from inside its subgraphs; every def-use index (the
consumers here, dead-node removal, topological order, unused initializers,
renaming, copy-on-write of constants) goes through it.
"""
from __future__ import annotations

import sys
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.ir.model_io import external_values
from onnxprune.ir.quant import Quantization, dequantize, dequantize_nbits, nbits_layout, quantized_weight, \
    weight_quantization
from onnxprune.ir.shapes import Shape, infer_shapes
from onnxprune.ir.subgraphs import all_names, outer_reads, reads, rename_reads, subgraphs  # noqa: F401 (re-exported)


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique, non-empty name: reports and plans refer to them."""
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)


CACHED_ELEMENTS = 4096


def tensor_values(t: onnx.TensorProto) -> np.ndarray:
    """Decode an initializer; raw little-endian data is viewed, not copied, and
    data still on disk is memory-mapped, not read."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return external_values(t)
    if t.HasField("raw_data") and t.data_location != onnx.TensorProto.EXTERNAL and sys.byteorder == "little":
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        if dtype.kind in "fiub" and t.data_type != onnx.TensorProto.BFLOAT16:
            return np.frombuffer(t.raw_data, dtype=dtype).reshape(tuple(t.dims))
    return numpy_helper.to_array(t)


class GraphView:
    def __init__(self, model: onnx.ModelProto, shapes: dict | None = None):
        self.model = model
        graph = model.graph
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.shapes = shapes if shapes is not None else infer_shapes(model)
        self.graph_inputs = [i.name for i in graph.input]
        self.graph_outputs = [o.name for o in graph.output]
        self.producer: dict[str, onnx.NodeProto] = {}
        #: tensor -> [(reader, input index)]; index -1: read inside the reader's subgraphs
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in self.nodes:
            for o in node.output:
                if o:
                    self.producer[o] = node
            for idx, i in enumerate(node.input):
                if i:
                    self.consumers[i].append((node, idx))
            for i in outer_reads(node):
                self.consumers[i].append((node, -1))
        self.opset = next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13
        )
        self._values: dict[str, np.ndarray] = {}
        #: output of a DequantizeLinear of constants -> how it reads them: a weight stored quantized (QDQ).
        #: It counts as a constant (rules slice it like a float weight; AnalysisState.param slices its integers)
        self.dequantized: dict[str, Quantization] = {}
        for node in self.nodes:
            if node.op_type == "DequantizeLinear" and node.output and node.output[0]:
                q = quantized_weight(self, node)
                if q is not None and all(not n or n in self.initializers for n in (q.scale, q.zero_point)):
                    self.dequantized[node.output[0]] = q

    # -- constants -----------------------------------------------------------
    def is_const(self, name: str) -> bool:
        return name in self.initializers or name in self.dequantized

    def const(self, name: str) -> np.ndarray | None:
        """The initializer's values (a dequantized weight's real values).  Small ones are cached;
        weights are decoded on each call so that a full second copy of the model never sits in memory."""
        if name in self.dequantized:
            return self._dequantize(self.dequantized[name])
        t = self.initializers.get(name)
        if t is None:
            return None
        if name in self._values:
            return self._values[name]
        values = tensor_values(t)
        if values.size <= CACHED_ELEMENTS:
            self._values[name] = values
        return values

    def weight(self, name: str) -> np.ndarray | None:
        """The real values of a weight: an integer initializer that a node reads as a quantized
        weight (DequantizeLinear, ConvInteger, MatMulInteger, the QOperator ops, DynamicQuantizeLSTM:
        onnxprune.ir.quant) is dequantized with that node's scale and zero point, MatMulNBits' packed
        B as [N, blocks, block_size]; anything else is returned as stored."""
        for reader, index in self.consumers.get(name, ()):
            q = weight_quantization(self, reader, index) if index >= 0 else None
            if q is not None and all(not n or n in self.initializers for n in (q.scale, q.zero_point)):
                return self._dequantize(q)
            layout = nbits_layout(self, reader) if index == 1 else None
            if layout is not None and all(self.is_const(i) for i in reader.input[1:4] if i):
                zero_points = self.const_input(reader, 3)
                return dequantize_nbits(layout, self.const(name), self.const_input(reader, 2), zero_points)
        return self.const(name)

    def _dequantize(self, q: Quantization) -> np.ndarray:
        return dequantize(q, self.const(q.data), self.const(q.scale) if q.scale else None,
                          self.const(q.zero_point) if q.zero_point else None)

    def const_input(self, node: onnx.NodeProto, index: int) -> np.ndarray | None:
        if index >= len(node.input) or not node.input[index]:
            return None
        return self.const(node.input[index])

    def has_input(self, node: onnx.NodeProto, index: int) -> bool:
        return index < len(node.input) and bool(node.input[index])

    # -- shapes --------------------------------------------------------------
    def shape(self, name: str) -> Shape | None:
        entry = self.shapes.get(name)
        return None if entry is None else entry[1]

    def rank(self, name: str) -> int | None:
        s = self.shape(name)
        return None if s is None else len(s)

    def dim(self, name: str, axis: int, _depth: int = 0) -> int | None:
        s = self.shape(name)
        if s is None or axis >= len(s):
            return None
        d = s[axis]
        if isinstance(d, int) and d > 0:
            return d
        return self._dim_through_slice(name, axis, _depth)

    def _dim_through_slice(self, name: str, axis: int, depth: int) -> int | None:
        """Shape inference loses every dim of a Slice with run-time bounds, even on the
        axes it does not slice (a causal-mask buffer sliced to the sequence length)."""
        node = self.producer.get(name)
        if node is None or node.op_type != "Slice" or depth > 8 or not self.has_input(node, 3):
            return None
        axes = self.const_input(node, 3)
        rank = self.rank(node.input[0])
        if axes is None or rank is None:
            return None
        if axis in {int(a) + rank if a < 0 else int(a) for a in np.atleast_1d(axes)}:
            return None
        return self.dim(node.input[0], axis, depth + 1)

    # -- attributes ----------------------------------------------------------
    @staticmethod
    def attr(node: onnx.NodeProto, name: str, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default
