"""Constant folding of nodes whose inputs are all initializers.

Exporters leave small constant subgraphs around weights (Unsqueeze of a BN
scale, Identity of a shared weight, Reshape of a bias).  Analysis needs them as
plain initializers, so we evaluate them once with onnx's reference evaluator.
Outputs larger than the limit stay as nodes (folding must not bloat the model).

Folding must not copy a shared weight either: an Identity of a constant is
replaced by the constant itself (its readers read it directly, one tensor);
identical nodes (the same Transpose of one weight before each of its
readers) are evaluated once and their readers share the result; and a node
whose folded output would sit next to a large input that other nodes still
read (the transposed LM head of a tied embedding table) stays a node.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.ir.graph_view import reads
from onnxprune.ir.model_io import small_vector, with_values
from onnxprune.ir.subgraphs import outer_names

log = logging.getLogger(__name__)

# DequantizeLinear stays: folding it would store its int8 weight as float (4x the bytes) and lose the
# quantization; analysis reads through it instead (GraphView.dequantized, AnalysisState.param)
NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
              "Bernoulli", "If", "Loop", "Scan", "Dropout", "DequantizeLinear"}
MAX_FOLDED_ELEMENTS = 1 << 26  # 256 MB of float32 at most


def fold_constants(model: onnx.ModelProto) -> int:
    """Fold in place; returns the number of nodes folded (Identity nodes removed included)."""
    graph = model.graph
    values: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    pinned = outputs | outer_names(graph)  # names that must keep existing as they are
    opsets = {o.domain: o.version for o in model.opset_import}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            if i:
                readers.setdefault(i, []).append(node)
    alias: dict[str, str] = {}  # removed tensor -> the tensor its readers read instead
    evaluated: dict[tuple, list[str]] = {}  # node key -> outputs of the folded node with that key
    kept, folded = [], 0
    for node in graph.node:
        for idx, name in enumerate(node.input):
            node.input[idx] = alias.get(name, name)
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
        key = _key(node, alias)
        same = [node.input[0]] if node.op_type == "Identity" else evaluated.get(key)
        if same is not None and not any(o in pinned for o in node.output):
            for out, target in zip(node.output, same):  # read the constant or the earlier result
                alias[out] = target
                readers.setdefault(target, []).extend(readers.pop(out, []))
            _unread(node, readers)
            folded += 1
            continue
        results = _evaluate(node, values, opsets)
        if results is None or _duplicates(node, key, results, values, readers, alias, pinned):
            kept.append(node)
            continue
        for name, arr in zip(node.output, results):
            tensor = numpy_helper.from_array(np.asarray(arr), name)
            graph.initializer.append(tensor)
            values[name] = tensor
        evaluated.setdefault(key, list(node.output))
        _unread(node, readers)
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
        used = {i for n in graph.node for i in reads(n)} | outputs  # subgraphs' outer reads too
        live = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(live)
    return folded


def _key(node: onnx.NodeProto, alias: dict[str, str]) -> tuple:
    """Equal keys: the same op on the same inputs with the same attributes (the same result)."""
    attrs = tuple(a.SerializeToString() for a in sorted(node.attribute, key=lambda a: a.name))
    return node.domain, node.op_type, tuple(alias.get(i, i) for i in node.input), attrs


def _unread(node: onnx.NodeProto, readers: dict[str, list[onnx.NodeProto]]) -> None:
    for i in set(node.input):
        if i in readers:
            readers[i] = [r for r in readers[i] if r is not node]


def _duplicates(node, key, results, values, readers, alias, pinned) -> bool:
    """Whether folding `node` would store a large result next to a large input that stays read:
    by a graph output or subgraph, or by a node that is not the same computation."""
    if all(small_vector(np.shape(r)) for r in results):
        return False
    for i in set(node.input):
        if not i or small_vector(values[i].dims):  # a shape constant, a bias: cheap to keep twice
            continue
        others = [r for r in readers.get(i, []) if r is not node]
        if i in pinned or any(_key(r, alias) != key for r in others):
            log.debug("not folding %s: '%s' stays read elsewhere, its result would be a copy", node.name, i)
            return True
    return False


def _evaluate(node, values, opsets):
    from onnx.reference import ReferenceEvaluator

    inputs = [i for i in node.input if i]
    graph = helper.make_graph(
        [node],
        "fold",
        [],
        [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o],
        initializer=[with_values(values[i]) for i in inputs],  # weights still on disk are read here
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
