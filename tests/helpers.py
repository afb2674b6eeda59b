"""Shared test helpers: build graphs with onnx.helper, prune them, and check the
pruned model against the masking oracle in onnxruntime."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxprune.ir.model_io import materialized
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
                         optimize: bool = True):
    """Prune random units and assert pruned == dense-with-units-masked.

    optimize=False compares the graphs as written: onnxruntime fuses DequantizeLinear -> Conv ->
    QuantizeLinear into integer kernels whose results differ from the float ops they replace, and
    the oracle's Mul-by-mask stops that fusion where it sits.
    Returns (analysis, pruned model, removed roots) for further assertions.
    """
    working, _ = prepare(model)
    analysis = build_analysis(working)
    removed = random_removal(analysis, fraction, seed)
    assert removed, "nothing was prunable"
    reference = masked_reference(working, analysis, removed)
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
