"""Cost model: parameters, MACs and FLOPs per node and in total.

Conventions (used everywhere in reports):
* MACs count multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul
  (and of their integer versions: ConvInteger, MatMulInteger, MatMulNBits, and
  the QOperator format's QLinearConv, QLinearMatMul and QGemm),
  of LSTM, GRU and RNN (X by W and the previous state by R, at every step
  and in every direction; onnxruntime's int8 DynamicQuantizeLSTM likewise),
  and of onnxruntime's fused attention contrib ops (com.microsoft Attention:
  QKV projection, scores and context; MultiHeadAttention and
  GroupQueryAttention: scores and context, the full S x L square even when
  causal, as the decomposed MatMuls are counted).
* FLOPs = 2 x MACs (recurrent ops: their gates' element-wise work left out)
  + one operation per output element of every other node
  (pooling counts its window size; LRN and Softmax their per-element work).
* Parameters count every element of every distinct initializer once: copies
  of one tensor (identical type, shape and bytes) count once, so a weight read
  by several layers is one weight, and the count is what a de-duplicated file
  stores.  `param_bytes` is their size in bytes.
Dynamic dimensions are evaluated at the shapes given for validation
(batch 1 by default).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.ir.graph_view import GraphView
from onnxprune.ir.model_io import unique_parameters
from onnxprune.ir.shapes import infer_shapes
from onnxprune.runtime.inputs import concrete_input_shapes

# counted as their float op (MatMulNBits: com.microsoft, weight-only low-bit; QGemm: com.microsoft)
INTEGER_LINEAR = {"ConvInteger": "Conv", "MatMulInteger": "MatMul", "MatMulNBits": "MatMul",
                  "QLinearConv": "Conv", "QLinearMatMul": "MatMul", "QGemm": "Gemm"}
# the inputs of a linear op that are its operands (the others are scales and zero points); the
# weight is the constant one (a MatMul's may be either)
OPERANDS = {"QLinearConv": (0, 3), "QLinearMatMul": (0, 3), "QGemm": (0, 3)}


def linear_operands(node: onnx.NodeProto) -> tuple[str, str]:
    """(input, weight) names of a linear op, integer versions included: what its MACs are read from."""
    a, b = OPERANDS.get(node.op_type, (0, 1))
    return (node.input[a] if len(node.input) > a else "", node.input[b] if len(node.input) > b else "")
LINEAR_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"} | set(INTEGER_LINEAR)
RECURRENT_OPS = {"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"}  # the last one com.microsoft
CONTRIB_ATTENTION = {"Attention", "MultiHeadAttention", "GroupQueryAttention"}  # domain com.microsoft
# QuantizeLinear/DequantizeLinear count nothing: onnxruntime fuses them into the integer kernel they
# surround, and a QDQ model then costs what its float original does (the same --target-flops, the same plan)
FREE_OPS = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Shape", "Size", "Transpose", "Concat",
            "Split", "Slice", "Gather", "Constant", "ConstantOfShape", "Cast", "Dropout", "Expand",
            "QuantizeLinear", "DequantizeLinear"}


# Ops that do much more than one operation per output element.
PER_ELEMENT = {
    # sum of squares over `size` neighbours, then scale, add, power and divide
    "LRN": lambda node, view: 2 * int(view.attr(node, "size", 5)) + 4,
    "Softmax": lambda node, view: 4,  # max, exp, sum, divide
    "LogSoftmax": lambda node, view: 5,
}


@dataclass
class NodeCost:
    name: str
    op_type: str
    macs: int
    flops: int


@dataclass
class ModelCost:
    nodes: list[NodeCost] = field(default_factory=list)
    params: int = 0
    param_bytes: int = 0
    op_counts: Counter = field(default_factory=Counter)

    @property
    def macs(self) -> int:
        return sum(n.macs for n in self.nodes)

    @property
    def flops(self) -> int:
        return sum(n.flops for n in self.nodes)

    def by_node(self) -> dict[str, NodeCost]:
        return {n.name: n for n in self.nodes}


def _numel(shape) -> int | None:
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
        return None
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def node_macs(node: onnx.NodeProto, view: GraphView) -> int:
    op = INTEGER_LINEAR.get(node.op_type, node.op_type)
    if _recurrent(node):
        return _recurrent_macs(node, view)
    y = view.shape(node.output[0])
    out = _numel(y)
    if out is None:
        return 0
    if node.domain == "com.microsoft" and node.op_type not in INTEGER_LINEAR:
        return _contrib_attention_macs(node, view, y) if op in CONTRIB_ATTENTION else 0
    if op == "Conv":
        w = view.shape(linear_operands(node)[1])
        k = _numel(w[1:]) if w else None
        return out * (k or 0)
    if op == "ConvTranspose":
        x, w = (view.shape(t) for t in linear_operands(node))
        if not x or not w:
            return 0
        return (_numel(x) or 0) * w[1] * (_numel(w[2:]) or 0)  # w: (Cin, Cout/group, k...)
    if op == "Gemm":
        a = view.shape(node.input[0])
        if not a:
            return 0
        k = a[0] if int(view.attr(node, "transA", 0)) else a[1]
        return out * (k if isinstance(k, int) else 0)
    if op == "MatMul":
        a = view.shape(node.input[0])
        if not a or not isinstance(a[-1], int):
            return 0
        return out * a[-1]
    return 0


def _recurrent(node: onnx.NodeProto) -> bool:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    return node.op_type in RECURRENT_OPS and domain == ("com.microsoft" if node.op_type.startswith("Dynamic") else "")


def _recurrent_macs(node: onnx.NodeProto, view: GraphView) -> int:
    """seq x batch x (|W| + |R|): every step multiplies X by W [directions, gates*hidden, input]
    and the previous state by R [directions, gates*hidden, hidden]; Y may be absent, X is not."""
    steps = _numel((view.shape(node.input[0]) or [None])[:2])  # seq x batch in either layout
    weights = [_numel(view.shape(node.input[i])) for i in (1, 2)]
    if steps is None or None in weights:
        return 0
    return steps * sum(weights)


def _contrib_attention_macs(node: onnx.NodeProto, view: GraphView, y) -> int:
    """[B, S, D] in, [B, S, Dv] out: B*S*L*(D_qk + Dv) for scores and context (L: key length),
    plus the packed QKV projection of Attention."""
    x = view.shape(node.input[0])
    if not x or len(x) != 3 or len(y) != 3:
        return 0
    batch_seq = _numel(x[:2])
    if batch_seq is None or not isinstance(y[2], int):
        return 0
    if node.op_type == "Attention":
        w = view.shape(node.input[1])
        if not w or len(w) != 2 or not all(isinstance(d, int) for d in w):
            return 0
        sizes = view.attr(node, "qkv_hidden_sizes")
        q_width = int(sizes[0]) if sizes is not None else w[1] // 3
        return batch_seq * w[0] * w[1] + batch_seq * x[1] * (q_width + y[2])
    key = node.input[1] if len(node.input) > 1 else ""
    k_shape = view.shape(key) if key else None
    length = k_shape[1] if k_shape and len(k_shape) == 3 else x[1]
    if not isinstance(length, int):
        return 0
    q_width = y[2] if node.op_type == "GroupQueryAttention" else x[2]  # packed GQA query holds K and V too
    return batch_seq * length * (q_width + y[2]) if isinstance(q_width, int) else 0


def node_flops(node: onnx.NodeProto, view: GraphView, macs: int) -> int:
    if node.op_type in LINEAR_OPS or (node.domain == "com.microsoft" and node.op_type in CONTRIB_ATTENTION):
        return 2 * macs
    if _recurrent(node):
        return 2 * macs
    if node.op_type in FREE_OPS:
        return 0
    out = _numel(view.shape(node.output[0])) or 0
    if node.op_type in PER_ELEMENT:
        return out * PER_ELEMENT[node.op_type](node, view)
    kernel = view.attr(node, "kernel_shape")
    if kernel is not None and "Pool" in node.op_type:
        return out * int(np.prod(kernel))
    if node.op_type.startswith("Global") or node.op_type.startswith("Reduce"):
        return _numel(view.shape(node.input[0])) or 0
    return out


def model_cost(model: onnx.ModelProto, fixed_inputs: dict[str, list[int]] | None = None) -> ModelCost:
    """Cost of `model` at concrete input shapes (the model's value_info is left alone).

    Without `fixed_inputs`, dynamic dimensions take the validation defaults.
    """
    if fixed_inputs is None:
        fixed_inputs = concrete_input_shapes(model)
    saved = list(model.graph.value_info)
    shapes = infer_shapes(model, fixed_inputs)
    del model.graph.value_info[:]
    model.graph.value_info.extend(saved)
    view = GraphView(model, shapes)
    cost = ModelCost()
    for node in view.nodes:
        macs = node_macs(node, view)
        cost.nodes.append(NodeCost(node.name, node.op_type, macs, node_flops(node, view, macs)))
        cost.op_counts[node.op_type] += 1
    cost.params, cost.param_bytes = unique_parameters(model)
    return cost
