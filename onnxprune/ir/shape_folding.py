"""onnx's shape inference, helped through the shape computations it leaves open.

onnx infers a Slice whose bounds are computed at run time (Shape -> Gather ->
Unsqueeze) only as far as its rank: in a BERT export the position ids slice
leaves every tensor after the embeddings with unknown batch and sequence dims.
At concrete input sizes those computations are numbers: we evaluate them (the
Shape of a tensor whose shape is known, then what reads only such values and
small constants), put the results in as constants and infer again, until
nothing more folds. This replaces onnxruntime's symbolic inference (and the
import of sympy it needs) wherever it answers everything.

Named dims ('batch', 'sequence') are given made-up sizes, in three runs with
different ones: a dim that follows one name's sizes in every run is that name,
one that is the same number in every run is that number, anything else
(an expression of the names, or a size clamped by a table's length) stays
unknown for the symbolic fallback.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

# Ops that shape computations are made of: on small inputs their outputs are small. Any other op (a
# ConstantOfShape, an Expand) folds once inference says its outputs are small.
SHAPE_OPS = {"Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "CastLike", "Identity", "Reshape",
             "Flatten", "Transpose", "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Sign", "Floor", "Ceil",
             "Sqrt", "Pow", "Reciprocal", "Min", "Max", "Clip", "Equal", "Less", "LessOrEqual", "Greater",
             "GreaterOrEqual", "Not", "And", "Or", "Where", "ReduceProd", "ReduceSum", "ReduceMin", "ReduceMax"}
# Initializers up to this many elements keep their values in the skeleton (onnxprune.ir.shapes): enough
# for any shape constant, far below any weight matrix. Computed values up to this size are folded.
SMALL_CONSTANT = 64
# values that are not a function of the inputs (or run a subgraph)
NEVER_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
              "Dropout", "If", "Loop", "Scan"}
MAX_ROUNDS = 8
# The sizes named dims take in each run (the i-th name takes the i-th size). For any two names the three
# (size of one, size of the other) points are not on a line, so no dim computed as a*x + b from one name
# reads back as another; the first run's sizes are small, so a size clamped by a table reads back unknown.
RUN_SIZES = [(2, 3, 5, 7, 11, 13, 17, 19),
             (23, 41, 37, 61, 29, 53, 47, 43),
             (67, 71, 97, 83, 89, 101, 79, 73)]

Shapes = dict[str, tuple[int, tuple]]


def infer_folded(sk: onnx.ModelProto, collect) -> Shapes:
    """Shapes of the skeleton `sk` by onnx's inference with shape computations folded, read back to the
    names of its inputs' dims; {} unless that tells every dim (or when an input has a dynamic dim without
    a name). `collect` turns an inferred model into shapes (onnxprune.ir.shapes)."""
    names = _dim_names(sk)
    if names is None or len(names) > len(RUN_SIZES[0]):
        return {}
    if not names:
        return _folded(sk, collect)
    runs: list[Shapes] = []
    for sizes in RUN_SIZES:
        runs.append(_folded(_at_sizes(sk, dict(zip(names, sizes))), collect))
        found = _read_back(runs, {name: tuple(s[i] for s in RUN_SIZES[:len(runs)]) for i, name in enumerate(names)})
        if any(d is None for _, shape in found.values() for d in shape):
            return {}  # stop at the first run that leaves a dim open: the symbolic fallback runs anyway
    return found


def _dim_names(sk: onnx.ModelProto) -> list[str] | None:
    names: list[str] = []
    for vi in sk.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                continue
            if not d.HasField("dim_param"):
                return None
            if d.dim_param not in names:
                names.append(d.dim_param)
    return names


def _at_sizes(sk: onnx.ModelProto, sizes: dict[str, int]) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(sk)
    for vi in model.graph.input:
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                value = sizes[d.dim_param]
                d.Clear()
                d.dim_value = value
    return model


def _folded(sk: onnx.ModelProto, collect) -> Shapes:
    model = onnx.ModelProto()
    model.CopyFrom(sk)
    shapes: Shapes = {}
    for _ in range(MAX_ROUNDS):
        try:
            shapes = collect(onnx.shape_inference.infer_shapes(model, data_prop=True))
        except Exception:  # inference errors at made-up sizes: what earlier rounds found stands
            return shapes
        if all(_static(entry) is not None for entry in shapes.values()) or not _fold(model, shapes):
            break
    return shapes


def _static(entry) -> list[int] | None:
    if entry is None or not all(isinstance(d, int) and d >= 0 for d in entry[1]):
        return None
    return list(entry[1])


def _small(entry) -> bool:
    shape = _static(entry)
    return shape is not None and int(np.prod(shape, dtype=np.int64)) <= SMALL_CONSTANT


def _fold(model: onnx.ModelProto, shapes: Shapes) -> bool:
    """Replace the Shape and Size nodes of tensors with known shapes, and the shape computations that
    read only their results and small constants, by constants; False if nothing folds."""
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    values: dict[str, np.ndarray] = {}
    computed: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        shape = _static(shapes.get(node.input[0])) if node.op_type in ("Shape", "Size") and node.input else None
        if shape is not None:
            values[node.output[0]] = _shape_value(node, shape)
        elif (node.op_type not in NEVER_FOLD and any(i in values for i in node.input)
              and all(not i or i in values or i in constants for i in node.input)
              and (node.op_type in SHAPE_OPS or all(_small(shapes.get(o)) for o in node.output if o))):
            computed.append(node)
            values.update((o, None) for o in node.output if o)
    if not values:
        return False
    if computed and not _evaluate(model, computed, values):
        return False
    done = set(values)
    kept = [n for n in graph.node if not any(o in done for o in n.output)]
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v), name) for name, v in values.items())
    return True


def _shape_value(node: onnx.NodeProto, shape: list[int]) -> np.ndarray:
    if node.op_type == "Size":
        return np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return np.array(shape[start:end], dtype=np.int64)  # Python's slice clamps as Shape-15 does


def _evaluate(model: onnx.ModelProto, nodes: list[onnx.NodeProto], values: dict[str, np.ndarray | None]) -> bool:
    """Run the shape computations once; fills `values`."""
    known = {name for name, v in values.items() if v is not None}
    reads = {i for n in nodes for i in n.input if i}
    inits = [numpy_helper.from_array(values[i], i) for i in reads & known]
    inits += [t for t in model.graph.initializer if t.name in reads and t.name not in known]
    outputs = [o for n in nodes for o in n.output if o]
    graph = onnx.helper.make_graph(nodes, "shapes", [], [onnx.helper.make_empty_tensor_value_info(o)
                                                         for o in outputs], initializer=inits)
    results = _run(onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version))
    if results is None:  # what neither can evaluate stays for the symbolic fallback
        return False
    values.update(zip(outputs, results))
    return True


def _run(model: onnx.ModelProto) -> list[np.ndarray] | None:
    """onnxruntime's outputs for a model without inputs (its session on a few shape ops opens in
    milliseconds), else onnx's reference evaluator's (an op or opset onnxruntime refuses; importing the
    evaluator alone takes a tenth of a second), else None."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 4
    try:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {})
    except Exception:  # onnxruntime raises its own exception types
        pass
    from onnx.reference import ReferenceEvaluator

    try:
        return ReferenceEvaluator(model).run(None, {})
    except Exception:
        return None


def _read_back(runs: list[Shapes], patterns: dict[str, tuple[int, ...]]) -> Shapes:
    """One shape per tensor: each dim a number, the name whose sizes it took in every run, or None."""
    out: Shapes = {}
    for name, (elem, shape) in runs[0].items():
        others = [run.get(name) for run in runs[1:]]
        if any(o is None or o[0] != elem or len(o[1]) != len(shape) for o in others):
            continue
        dims = zip(shape, *(o[1] for o in others))
        out[name] = (elem, tuple(_read_dim(values, patterns) for values in dims))
    return out


def _read_dim(values: tuple, patterns: dict[str, tuple[int, ...]]) -> int | str | None:
    if not all(isinstance(v, int) for v in values):
        return None
    if len(set(values)) == 1:
        return values[0]
    return next((name for name, sizes in patterns.items() if sizes == values), None)
