"""Shared test helpers: build graphs with onnx.helper, prune them, and check the
pruned model against the masking oracle in onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.ir.model_io import materialized
from onnxprune.ir.quant import dequantize, weight_quantization
from onnxprune.ir.shapes import infer_shapes
from onnxprune.passes.apply_plan import ApplyPlan
from onnxprune.passes.cleanup import DropUnusedInitializers
from onnxprune.pipeline import build_analysis, prepare
from onnxprune.runtime.session import make_session
from onnxprune.runtime.validate import runtime_only_ops
from onnxprune.testing import masked_reference

RNG = np.random.default_rng(1234)


def weight(*shape, name: str, scale: float = 0.5) -> onnx.TensorProto:
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def const(value, name: str, dtype=np.int64) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = 17) -> onnx.ModelProto:
    """inputs/outputs: [(name, shape)] float tensors; a dimension may be None (unknown)."""
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        initializer=list(initializers),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def analysis_of(model: onnx.ModelProto):
    working, _ = prepare(model)
    return build_analysis(working)


def random_removal(analysis, fraction: float, seed: int = 0) -> set[int]:
    """Remove `fraction` of every prunable group's units (at least one, keeping one)."""
    rng = np.random.default_rng(seed)
    removed: set[int] = set()
    for g in analysis.prunable_groups():
        k = min(max(1, int(g.size * fraction)), g.size - 1)
        removed |= {int(r) for r in rng.choice(g.roots, k, replace=False)}
    return removed


def run(model: onnx.ModelProto, feeds: dict, optimize: bool = True) -> list[np.ndarray]:
    return make_session(model, optimize=optimize).run(None, feeds)


def feeds_for(model: onnx.ModelProto, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        shape = [d.dim_value if d.dim_value > 0 else 2 + i for i, d in enumerate(vi.type.tensor_type.shape.dim)]
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        if dtype.kind == "f":
            out[vi.name] = rng.standard_normal(shape).astype(dtype)
        else:  # token ids and masks: small non-negative integers are valid for both
            out[vi.name] = rng.integers(0, 2, shape).astype(dtype)
    return out


def prune_matches_oracle(model: onnx.ModelProto, fraction: float = 0.5, seed: int = 0, atol: float = 1e-4,
                         optimize: bool = True, oracle=masked_reference):
    """Prune random units and assert pruned == dense-with-units-masked.

    optimize=False compares the graphs as written: onnxruntime fuses DequantizeLinear -> Conv ->
    QuantizeLinear into integer kernels whose results differ from the float ops they replace, and
    the oracle's Mul-by-mask stops that fusion where it sits.
    oracle(model, analysis, removed) builds the reference (masked_quantized_reference for graphs
    whose integer ops read integer activations).
    Returns (analysis, pruned model, removed roots) for further assertions.
    """
    working, _ = prepare(model)
    analysis = build_analysis(working)
    removed = random_removal(analysis, fraction, seed)
    assert removed, "nothing was prunable"
    reference = oracle(working, analysis, removed)
    pruned = ApplyPlan(analysis, removed)(working).model
    pruned = DropUnusedInitializers()(pruned).model
    infer_shapes(pruned)
    if not runtime_only_ops(pruned):  # onnx.checker rejects onnxruntime's own ai.onnx-domain ops
        onnx.checker.check_model(materialized(pruned), full_check=True)  # tensors kept on disk, read in
    feeds = feeds_for(working, seed)
    got, want = run(pruned, feeds, optimize), run(reference, feeds, optimize)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, atol=atol, rtol=1e-4)
    return analysis, pruned, removed


def masked_quantized_reference(model: onnx.ModelProto, analysis, removed) -> onnx.ModelProto:
    """The masking oracle of a quantized graph: the dense model with the removed units made inert
    where they are consumed.  Float tensors are masked by a Mul (onnxprune.testing.masked_reference);
    an integer op's integer input (QLinearConv, QLinearMatMul, QGemm) cannot be, so the slices of its
    weight that read removed units (role weight_in) are set to the weight's zero point instead:
    q - zero_point is then exactly 0, and a removed unit adds exactly 0 to the integer accumulator
    whatever its activation, which is what removing it does.  The accumulators, and so the requantized
    outputs, are the pruned model's bit for bit."""
    reference = masked_reference(model, analysis, removed)
    masks = analysis.keep_masks(removed)
    for p in analysis.state.params:
        if p.role == "weight_in" and (p.tensor, p.axis) in masks:
            _to_zero_point(reference, analysis, p, ~masks[(p.tensor, p.axis)])
    return reference


def silence_removed_units(reference: onnx.ModelProto, analysis, removed, node_name: str) -> None:
    """In `reference`, give the removed units of the source `node_name` zero weights (integers: their
    zero point), biases and initial states, so they are exactly 0 at every step.  An op that quantizes
    its own hidden state at run time (DynamicQuantizeLSTM) takes the range over every unit: masking
    where they are consumed is not enough, they must not move that range either."""
    masks = analysis.keep_masks(removed)
    for p in analysis.state.params:
        if p.node == node_name and p.role in ("weight_out", "bias", "constant") and (p.tensor, p.axis) in masks:
            _to_zero_point(reference, analysis, p, ~masks[(p.tensor, p.axis)])


def _to_zero_point(model: onnx.ModelProto, analysis, p, removed: np.ndarray) -> None:
    """Set the `removed` positions along p.axis of initializer p.tensor to the zero point with which
    node p.node reads it (0 for a float tensor)."""
    tensor = next(t for t in model.graph.initializer if t.name == p.tensor)
    values = numpy_helper.to_array(tensor).copy()
    node = next(n for n in analysis.view.nodes if n.name == p.node)
    q = weight_quantization(analysis.view, node, list(node.input).index(p.tensor))
    zero = np.zeros(values.shape, values.dtype)
    if q is not None and q.zero_point:  # values - (values - zero_point): the zero point, broadcast
        offset = dequantize(q, values, None, analysis.view.const(q.zero_point))
        zero = np.round(values - np.broadcast_to(offset, values.shape)).astype(values.dtype)
    index = [slice(None)] * values.ndim
    index[p.axis] = np.flatnonzero(removed)
    values[tuple(index)] = zero[tuple(index)]
    tensor.CopyFrom(numpy_helper.from_array(values, p.tensor))


def blocked_reasons(model: onnx.ModelProto) -> list[str]:
    return [r for g in analysis_of(model).groups for r in g.blocked]


def conv(name: str, x: str, y: str, cin: int, cout: int, k: int = 3):
    """A same-padded KxK Conv with bias: (node, [weight, bias])."""
    node = helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [y], name=name,
                            kernel_shape=[k, k], pads=[k // 2] * 4)
    return node, [weight(cout, cin, k, k, name=f"{name}.w"), weight(cout, name=f"{name}.b")]


def group_of(analysis, source_node: str):
    """The group one of whose sources is `source_node`."""
    return next(g for g in analysis.groups if any(s.node == source_node for s in g.sources))


def relu_mlp(w1: np.ndarray, b1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """x (N, 4) -> Gemm fc1 (w1, b1) -> Relu -> Gemm fc2 (w2, zero bias) -> y (N, 3):
    the smallest model whose hidden units a criterion can rank."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="fc2")]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(b1, "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(3, np.float32), "b2")]
    return make_model(nodes, [("x", ["N", 4])], [("y", ["N", 3])], inits)
