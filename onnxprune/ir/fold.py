"""Constant folding of nodes whose inputs are all initializers.

Exporters leave small constant subgraphs around weights (Unsqueeze of a BN
scale, Identity of a shared weight, Reshape of a bias).  Analysis needs them as
plain initializers, so we evaluate them once with onnx's reference evaluator.
Outputs larger than the limit stay as nodes (folding must not bloat the model).
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
              "Bernoulli", "If", "Loop", "Scan", "Dropout"}
MAX_FOLDED_ELEMENTS = 1 << 26  # 256 MB of float32 at most


def fold_constants(model: onnx.ModelProto) -> int:
    """Fold in place; returns the number of nodes folded."""
    graph = model.graph
    values: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    opsets = {o.domain: o.version for o in model.opset_import}
    kept, folded = [], 0
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if (
            node.domain not in ("", "ai.onnx")
            or node.op_type in NEVER_FOLD
            or not inputs
            or not all(i in values for i in inputs)
            or any(o in outputs for o in node.output)
        ):
            kept.append(node)
            continue
        results = _evaluate(node, values, opsets)
        if results is None:
            kept.append(node)
            continue
        for name, arr in zip(node.output, results):
            tensor = numpy_helper.from_array(np.asarray(arr), name)
            graph.initializer.append(tensor)
            values[name] = tensor
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        used = {i for n in graph.node for i in n.input} | outputs
        live = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(live)
    return folded


def _evaluate(node, values, opsets):
    from onnx.reference import ReferenceEvaluator

    inputs = [i for i in node.input if i]
    graph = helper.make_graph(
        [node],
        "fold",
        [],
        [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o],
        initializer=[values[i] for i in inputs],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()])
    try:
        results = ReferenceEvaluator(m).run(None, {})
    except Exception as exc:  # leave anything the evaluator cannot do to the runtime
        log.debug("cannot fold %s: %s", node.name, exc)
        return None
    if any(np.asarray(r).size > MAX_FOLDED_ELEMENTS for r in results):
        return None
    return results
