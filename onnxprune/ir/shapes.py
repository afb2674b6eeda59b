"""Shape inference on a weight-free skeleton of the model.

ONNX shape inference copies the whole model; on a 100 MB network that costs a
second copy of every weight.  We infer on a *skeleton* instead: large
initializers become typed graph inputs (only their shapes matter), small ones
stay (they may be Reshape targets or Slice bounds).  The inferred value_info is
copied back.  Where onnx's own inference leaves dims open, the shape
computations are folded at concrete sizes (onnxprune.ir.shape_folding);
onnxruntime's symbolic shape inference is the fallback for graphs that still
leave them open (custom or contrib ops, dims that are expressions).
"""
from __future__ import annotations

import hashlib
import logging

import onnx
from onnx import helper

from onnxprune.ir.quant import CONTRIB_SHAPE_OPS, contrib_output_shapes
from onnxprune.ir.shape_folding import SMALL_CONSTANT, infer_folded

log = logging.getLogger(__name__)

Dim = int | str | None
Shape = tuple[Dim, ...]


def _numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n


def skeleton(model: onnx.ModelProto, fixed_inputs: dict[str, list[int]] | None = None) -> onnx.ModelProto:
    """A copy of `model` without large weight data, for shape work."""
    sk = onnx.ModelProto()
    sk.ir_version = model.ir_version
    sk.opset_import.extend(model.opset_import)
    g = sk.graph
    g.name = model.graph.name
    g.node.extend(model.graph.node)
    g.output.extend(model.graph.output)
    for vi in g.output:
        _unknown_negative_dims(vi)
    for vi in model.graph.input:
        new = g.input.add()
        new.CopyFrom(vi)
        _unknown_negative_dims(new)
        if fixed_inputs and vi.name in fixed_inputs:
            dims = new.type.tensor_type.shape.dim
            for d, value in zip(dims, fixed_inputs[vi.name]):
                d.Clear()
                d.dim_value = int(value)
    for t in model.graph.initializer:
        if _numel(t) <= SMALL_CONSTANT and t.data_location != onnx.TensorProto.EXTERNAL:
            g.initializer.append(t)
        else:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return sk


def _unknown_negative_dims(vi: onnx.ValueInfoProto) -> None:
    """paddle2onnx declares dynamic dims as -1: to inference they are unknown, not a size to check."""
    for d in vi.type.tensor_type.shape.dim:
        if d.HasField("dim_value") and d.dim_value < 0:
            d.Clear()


def _shape_of(vi: onnx.ValueInfoProto) -> tuple[int, Shape] | None:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    dims: list[Dim] = []
    for d in tt.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    return tt.elem_type, tuple(dims)


def _missing_outputs(model: onnx.ModelProto, known: set[str]) -> list[str]:
    """Used tensors (consumed or graph outputs) that inference left without a shape."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    return [o for n in model.graph.node for o in n.output if o and o in used and o not in known]


def infer_shapes(
    model: onnx.ModelProto, fixed_inputs: dict[str, list[int]] | None = None
) -> dict[str, tuple[int, Shape]]:
    """Infer every tensor's (elem_type, shape); replaces model.graph.value_info.

    Stale value_info is dropped first: after a rewrite it describes the old graph.
    """
    del model.graph.value_info[:]
    sk = skeleton(model, fixed_inputs)
    # the skeleton is all inference sees: equal bytes, equal answer
    key = hashlib.blake2b(sk.SerializeToString(), digest_size=32).digest()
    if _last is not None and _last[0] == key:
        shapes, value_info = _last[1], _last[2]
    else:
        shapes, value_info = _infer(sk)
        _remember(key, shapes, value_info)
    model.graph.value_info.extend(value_info.value_info)
    return dict(shapes)


# The last answer, by a digest of the skeleton's bytes: prune infers the dense model at its input
# shapes twice in a row (its cost, then its output shapes). The skeleton is small (weights over
# SMALL_CONSTANT elements are left out of it), and the value_info is kept in one message.
_last: tuple[bytes, dict[str, tuple[int, Shape]], onnx.GraphProto] | None = None


def _remember(key: bytes, shapes: dict[str, tuple[int, Shape]], value_info: onnx.GraphProto) -> None:
    global _last
    _last = (key, shapes, value_info)


def forget_shapes() -> None:
    """Drop the remembered answer (tests; a caller that wants the memory back)."""
    global _last
    _last = None


def _infer(sk: onnx.ModelProto) -> tuple[dict[str, tuple[int, Shape]], onnx.GraphProto]:
    """(shapes, a graph holding the inferred value_info entries to keep) for a skeleton."""
    try:
        inferred = onnx.shape_inference.infer_shapes(sk, data_prop=True)
    except Exception as exc:  # inference errors on odd graphs: try the fallback
        log.debug("onnx shape inference failed: %s", exc)
        inferred = sk
    shapes = _collect(inferred)
    if _incomplete(sk, shapes):
        shapes = _completed(sk, shapes)
    value_info = onnx.GraphProto()
    value_info.value_info.extend(vi for vi in inferred.graph.value_info if vi.name in shapes)
    return shapes, value_info


def _completed(sk: onnx.ModelProto, shapes: dict[str, tuple[int, Shape]]) -> dict[str, tuple[int, Shape]]:
    """`shapes`, completed by folding the shape computations when that answers everything (no sympy:
    a second to import), else by onnxruntime's symbolic inference, which follows Shape->Concat->Reshape
    arithmetic that onnx's leaves as unk__N dims (attention head splits with -1) and knows contrib ops.
    (A tensor without any shape comes from an op onnx does not know: folding cannot help there.)"""
    if not _missing_outputs(sk, set(shapes)):
        folded = dict(shapes)
        _fill(folded, infer_folded(sk, _collect))
        if not _incomplete(sk, folded):
            return folded
    _fill(shapes, _symbolic(sk))
    return shapes


def _incomplete(sk: onnx.ModelProto, shapes: dict[str, tuple[int, Shape]]) -> bool:
    return bool(_missing_outputs(sk, set(shapes))) or any(_is_unknown(d) for _, shape in shapes.values() for d in shape)


def _fill(shapes: dict[str, tuple[int, Shape]], found: dict[str, tuple[int, Shape]]) -> None:
    """Add what `found` knows and `shapes` does not: missing tensors, unknown dims."""
    for name, (elem, shape) in found.items():
        if name not in shapes:
            shapes[name] = (elem, shape)
        elif len(shape) == len(shapes[name][1]):
            merged = tuple(b if _is_unknown(a) and not _is_unknown(b) else a for a, b in zip(shapes[name][1], shape))
            shapes[name] = (shapes[name][0], merged)


def _is_unknown(d: Dim) -> bool:
    return d is None or (isinstance(d, str) and d.startswith("unk__"))


def _collect(model: onnx.ModelProto) -> dict[str, tuple[int, Shape]]:
    shapes = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        s = _shape_of(vi)
        if s is not None:
            shapes[vi.name] = s
    for t in model.graph.initializer:
        shapes[t.name] = (t.data_type, tuple(t.dims))
    return shapes


def _symbolic(sk: onnx.ModelProto) -> dict[str, tuple[int, Shape]]:
    """onnxruntime's symbolic inference, keeping what it found when it stops short.

    Its `infer_shapes` raises on an incomplete pass, after saving the partial
    model as sym_shape_infer_temp.onnx into the current directory; running its
    steps here keeps the partial shapes and writes no file.
    """
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError as exc:  # sympy missing: say so once, loudly; never degrade in silence
        _warn_no_symbolic(exc)
        return {}
    try:
        inference = SymbolicShapeInference(2**31 - 1, True, True, 0)  # int_max, auto_merge, guess_output_rank, verbose
        _add_quantized_ops(inference)
        inference._preprocess(sk)
        while inference.run_:
            inference._infer_impl()
        inference._update_output_from_vi()
        out = inference.out_mp_
    except Exception as exc:
        log.debug("symbolic shape inference failed: %s", exc)
        return {}
    return _collect(out)


def _add_quantized_ops(inference) -> None:
    """onnxruntime's inference guesses the outputs of com.microsoft QOperator ops it does not know from
    input 0 (QLinearConcat's size, DynamicQuantizeLSTM's rank come out wrong): onnxprune.ir.quant says."""
    def infer(node):
        shapes = [inference._get_shape(node, i) if name else None for i, name in enumerate(node.input)]
        types = [(inference.known_vi_[n].type.tensor_type.elem_type if n in inference.known_vi_
                  else inference.initializers_[n].data_type) if n else 0 for n in node.input]
        for name, (elem, shape) in zip(node.output, contrib_output_shapes(node, shapes, types) or []):
            if name:
                inference.known_vi_[name].CopyFrom(helper.make_tensor_value_info(name, elem, shape))

    for op in CONTRIB_SHAPE_OPS:
        inference.dispatcher_.setdefault(op, infer)


_warned_no_symbolic = False


def _warn_no_symbolic(exc: ImportError) -> None:
    global _warned_no_symbolic
    if _warned_no_symbolic:
        return
    _warned_no_symbolic = True
    log.warning(
        "onnxruntime's symbolic shape inference cannot run (%s). Shapes computed at run time stay unknown: "
        "attention heads are not detected, groups behind run-time Reshapes are blocked and FLOPs are "
        "undercounted. Fix: pip install sympy (onnxprune declares it; reinstall with `pip install onnxprune`).",
        exc)


def static_shape(shapes: dict[str, tuple[int, Shape]], name: str) -> Shape | None:
    entry = shapes.get(name)
    return None if entry is None else entry[1]


def output_shapes(model: onnx.ModelProto, fixed: dict[str, list[int]]) -> list[tuple] | None:
    """The graph outputs' shapes at input shapes `fixed`, by inference; None for a dim it cannot
    tell (symbolic, data-dependent, or declared -1). The model's value_info is left empty."""
    shapes = infer_shapes(model, fixed)
    out = []
    for o in model.graph.output:
        entry = shapes.get(o.name)
        if entry is None:
            return None
        out.append(tuple(d if isinstance(d, int) and d >= 0 else None for d in entry[1]))
    del model.graph.value_info[:]
    return out
