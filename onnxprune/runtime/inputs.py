"""Concrete input shapes and random inputs for runs of a model.

Dynamic dimensions get sizes the model can run at, in this order:
--input-shape; the model's own static dims; its metadata (Ultralytics' `imgsz`);
then a profile of common sizes: batch 1, 224 for the spatial axes of an image
input, 128 for any other axis (sequences). Dimensions that share a symbolic name
share the value; a dim declared as -1 (paddle2onnx) is dynamic like a named one.

`probe_input_shapes` makes sure of it: it runs the dense model at the planned
sizes and, when that fails, at the next profiles (320, 640, ... for images;
16, 512, ... for sequences), so that nothing is ever validated at a size the
dense model cannot run; if none works, the error says so and shows
--input-shape. Prune probes up front only when it needs the dense outputs
(lossless) or validates many models (sweep); otherwise the pruned model's own
validation run is the check, and the dense model is probed only if something
fails at the planned sizes (`recheck_input_shapes`, called by
onnxprune.pipeline.stages.sizes_checked_on_failure): on BERT-base the
up-front probe was a fifth of prune's time.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper

from onnxprune.errors import OnnxPruneError, UnsupportedModelError, UsageError
from onnxprune.runtime.session import make_session

DEFAULT_BATCH = 1
# (spatial, other) sizes tried in turn for dynamic dims; the first is the plan without a run
SIZE_PROFILES = [(224, 128), (320, 16), (640, 512), (256, 64), (512, 2048), (1280, 16000)]
DEFAULT_DYNAMIC_DIM = SIZE_PROFILES[0][1]


@dataclass
class InputShapes:
    """Concrete shapes for every input, and what had to be assumed to get them."""

    shapes: dict[str, list[int]]
    assumed: list[str] = field(default_factory=list)  # one line per input whose dims were not all given
    outputs: list[np.ndarray] | None = None  # the dense model's outputs on random inputs (after a probe)
    feeds: dict[str, np.ndarray] | None = None
    checked: bool = False  # the dense model ran at these sizes (a probe did)

    def sizes(self) -> str:
        """'input_ids 1x128, attention_mask 1x128'."""
        return ", ".join(f"{n} {'x'.join(map(str, s))}" for n, s in self.shapes.items())

    def note(self) -> str | None:
        """One paragraph for analyze/prune output, or None when nothing was assumed."""
        if not self.assumed:
            return None
        example = ",".join(f"{n}:{'x'.join(map(str, s))}" for n, s in self.shapes.items())
        return ("input shapes assumed for validation and FLOPs: " + "; ".join(self.assumed)
                + f". Fix them with --input-shape {example}")


def _is_static(d) -> bool:
    return d.HasField("dim_value") and d.dim_value > 0  # -1 (paddle2onnx) and 0 are dynamic


def _spatial_axes(vi: onnx.ValueInfoProto) -> set[int]:
    """Axes of an image input (4-D float, NCHW or NHWC) that are height and width."""
    tt = vi.type.tensor_type
    dims = tt.shape.dim
    if len(dims) != 4 or helper.tensor_dtype_to_np_dtype(tt.elem_type).kind != "f":
        return set()
    if _is_static(dims[3]) and dims[3].dim_value in (1, 3, 4) and not _is_static(dims[1]):
        return {1, 2}  # NHWC with a small static channel count
    return {2, 3}


def _metadata_image_size(model: onnx.ModelProto) -> tuple[int, int] | None:
    """Ultralytics writes the training size as metadata imgsz: '[640, 640]' (or '640')."""
    for prop in model.metadata_props:
        if prop.key != "imgsz":
            continue
        try:
            value = ast.literal_eval(prop.value)
        except (ValueError, SyntaxError):
            return None
        if isinstance(value, int):
            return value, value
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
            return int(value[0]), int(value[1])
    return None


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {t.name for t in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _is_cache_input(vi: onnx.ValueInfoProto) -> bool:
    """A decoder's key-value cache as optimum and onnxruntime-genai name it (past_key_values.0.key,
    past_key.0, past_0): float, named past..."""
    dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    return dtype.kind == "f" and vi.name.lower().startswith("past")


def _evaluate(expression: str, symbols: dict[str, int]) -> int | None:
    """A dim named by arithmetic over other dims' names, as the dynamo exporter writes them ('past + 1'),
    from their planned values; None if it is not one (or names a dim not planned)."""
    try:
        tree = ast.parse(expression, mode="eval").body
    except SyntaxError:
        return None
    operators = {ast.Add: int.__add__, ast.Sub: int.__sub__, ast.Mult: int.__mul__, ast.FloorDiv: int.__floordiv__}

    def value(node) -> int | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return symbols.get(node.id)
        if isinstance(node, ast.BinOp) and type(node.op) in operators:
            left, right = value(node.left), value(node.right)
            if left is None or right is None or (isinstance(node.op, ast.FloorDiv) and right == 0):
                return None
            return operators[type(node.op)](left, right)
        return None

    return value(tree) if isinstance(tree, ast.BinOp) else None


def _has_expression(vi: onnx.ValueInfoProto) -> bool:
    """Some dim is named by arithmetic ('past + 1'), not by a plain name."""
    def arithmetic(text: str) -> bool:
        try:
            return isinstance(ast.parse(text, mode="eval").body, ast.BinOp)
        except SyntaxError:
            return False

    return any(d.HasField("dim_param") and arithmetic(d.dim_param) for d in vi.type.tensor_type.shape.dim)


def _default_size(vi, axis: int, spatial: set[int], image_size, sizes: tuple[int, int]) -> tuple[int, str]:
    """The size of a dynamic dim no given size or shared symbol fixes, and why."""
    if axis == 0:
        return DEFAULT_BATCH, "batch"
    if _is_cache_input(vi):
        return 0, "past length: an empty key-value cache, the first generation step"
    if axis in spatial and image_size is not None:
        return image_size[sorted(spatial).index(axis)], "imgsz metadata"
    if axis in spatial:
        return sizes[0], "image size"
    return sizes[1], "length"


def _cache_head_size(model: onnx.ModelProto, name: str) -> int | None:
    """The head size of a cache input whose last dim is a symbol (onnxruntime-genai's `kv_cache_dim`):
    the width of the projection feeding the GroupQueryAttention that reads it, over its heads (a packed
    query holds num_heads + 2 kv_num_heads of them, a separate key kv_num_heads). None if not found."""
    graph = model.graph
    for node in graph.node:
        if node.op_type != "GroupQueryAttention" or name not in node.input[3:5]:
            continue
        attrs = {a.name: a.i for a in node.attribute}
        heads, kv_heads = attrs.get("num_heads", 0), attrs.get("kv_num_heads", 0)
        packed = len(node.input) < 2 or not node.input[1]
        width = _projection_width(graph, node.input[0] if packed else node.input[1])
        count = heads + 2 * kv_heads if packed else kv_heads
        if width and count and width % count == 0:
            return width // count
    return None


def _projection_width(graph: onnx.GraphProto, tensor: str) -> int | None:
    """Output features of the MatMul/Gemm with a constant weight that makes `tensor`, through bias Adds,
    Casts and Identities."""
    producers = {o: n for n in graph.node for o in n.output}
    weights = {t.name: list(t.dims) for t in graph.initializer}
    for _ in range(8):
        node = producers.get(tensor)
        if node is None:
            return None
        if node.op_type == "MatMul" and node.input[1] in weights:
            return weights[node.input[1]][-1]
        if node.op_type == "Gemm" and node.input[1] in weights:
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            return weights[node.input[1]][0 if trans_b else -1]
        if node.op_type not in ("Add", "Cast", "Identity"):
            return None
        tensor = next((i for i in node.input if i and i not in weights), "")
    return None


def plan_input_shapes(model: onnx.ModelProto, given: dict[str, list[int]] | None = None,
                      profile: int = 0) -> InputShapes:
    """Shapes from --input-shape, static dims, metadata, then SIZE_PROFILES[profile]; nothing is run.
    A cache input's past length is 0; a dim named by an expression of others ('past + 1') is planned
    after them."""
    given = given or {}
    inputs = _real_inputs(model)
    names = [i.name for i in inputs]
    unknown = set(given) - set(names)
    if unknown:
        raise UsageError(f"--input-shape names {sorted(unknown)}, but the model's inputs are {names}")
    image_size = _metadata_image_size(model) if profile == 0 else None
    symbols: dict[str, int] = {}
    for vi in inputs:  # given sizes fix their symbols first, wherever the symbol appears
        for d, v in zip(vi.type.tensor_type.shape.dim, given.get(vi.name, [])):
            if d.HasField("dim_param"):
                symbols.setdefault(d.dim_param, v)
    result = InputShapes({})
    for vi in sorted(inputs, key=_has_expression):  # stable: expressions after the dims they name
        dims = vi.type.tensor_type.shape.dim
        if vi.name in given:
            if len(given[vi.name]) != len(dims):
                raise UsageError(
                    f"--input-shape for '{vi.name}' has {len(given[vi.name])} dims, the model input has {len(dims)}"
                )
            result.shapes[vi.name] = list(given[vi.name])
            continue
        spatial = set() if _is_cache_input(vi) else _spatial_axes(vi)
        shape, why = [], []
        for axis, d in enumerate(dims):
            if _is_static(d):
                shape.append(d.dim_value)
                continue
            key = d.dim_param if d.HasField("dim_param") else None
            if key in symbols:
                shape.append(symbols[key])
                continue
            derived = _evaluate(key, symbols) if key else None
            if derived is not None:
                value, reason = derived, "from the dims it names"
            elif _is_cache_input(vi) and axis == len(dims) - 1 and \
                    (head_size := _cache_head_size(model, vi.name)) is not None:
                value, reason = head_size, "head size, from the attention reading it"
            else:
                value, reason = _default_size(vi, axis, spatial, image_size, SIZE_PROFILES[profile])
            if key:
                symbols[key] = value
            shape.append(value)
            why.append(f"{key or f'axis {axis}'}={value} ({reason})")
        result.shapes[vi.name] = shape
        if why:
            result.assumed.append(f"{vi.name} {'x'.join(map(str, shape))} [{', '.join(why)}]")
    result.shapes = {name: result.shapes[name] for name in names}
    return result


def concrete_input_shapes(model: onnx.ModelProto, given: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    """plan_input_shapes(...).shapes: the first plan, without running the model."""
    return plan_input_shapes(model, given).shapes


def probe_input_shapes(model: onnx.ModelProto, given: dict[str, list[int]] | None,
                       run: Callable[[dict[str, np.ndarray]], list[np.ndarray]], seed: int = 0) -> InputShapes:
    """The first planned shapes the dense model runs at, with its outputs there.

    `run` runs the dense model on feeds (one session, many shapes). With every
    dim given or static there is one plan; a failure then is the model's own.
    """
    first = plan_input_shapes(model, given)
    plans = [first]
    if first.assumed:
        plans += [plan_input_shapes(model, given, i) for i in range(1, len(SIZE_PROFILES))]
    errors: list[str] = []
    seen: list[dict] = []
    for plan in plans:
        if plan.shapes in seen:
            continue
        seen.append(plan.shapes)
        feeds = random_inputs(model, plan.shapes, seed)
        try:
            plan.outputs = run(feeds)
        except Exception as exc:  # onnxruntime raises its own exception types
            errors.append(f"{plan.sizes()}: {_first_line(exc)}")
            continue
        plan.feeds, plan.checked = feeds, True
        if errors:
            plan.assumed.append(f"the dense model failed at {'; '.join(e.split(':')[0] for e in errors)}")
        return plan
    tried = "\n  ".join(errors)
    example = ",".join(f"{n}:{'x'.join(map(str, s))}" for n, s in first.shapes.items())
    if not first.assumed:
        raise UnsupportedModelError(
            f"the dense model itself does not run at the input shapes {first.sizes()}:\n  {tried}\n"
            "Check --input-shape (or the model's declared input shapes): they must be sizes the model runs at.")
    raise UnsupportedModelError(
        "the dense model itself does not run at any input size tried for its dynamic dims, so nothing can be "
        f"validated:\n  {tried}\nGive sizes it runs at (e.g. the size it was trained at) with --input-shape, "
        f"e.g. --input-shape {example} with your values.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def random_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = shapes[vi.name]
        if dtype.kind == "f":
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            values = rng.integers(0, 2, shape).astype(dtype)  # valid as token ids
            # an attention mask of ones: every position real, as in an unpadded batch (a random one masks
            # half the tokens, and a graph deriving lengths from it, onnxruntime-genai's, disagrees with its
            # cache); drawn all the same, so the inputs after it get the values they always had
            feeds[vi.name] = np.ones_like(values) if "mask" in vi.name.lower() else values
        elif dtype.kind == "b":
            feeds[vi.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            raise OnnxPruneError(f"input '{vi.name}' has type {dtype}, which random validation cannot generate")
    return feeds


def dense_input_shapes(model: onnx.ModelProto, given: dict[str, list[int]] | None, seed: int = 0,
                       probe: bool = False) -> InputShapes:
    """Input sizes for the dense model: with `probe`, run there (`probe_input_shapes`, with its outputs
    there), else planned, unchecked (see `recheck_input_shapes`)."""
    if not probe:
        return plan_input_shapes(model, given)
    return probe_dense(model, given, seed)


def probe_dense(model: onnx.ModelProto, given: dict[str, list[int]] | None, seed: int = 0) -> InputShapes:
    session = make_session(model, prepack=False, optimize=False)
    return probe_input_shapes(model, given, _quiet_runner(session), seed)


def recheck_input_shapes(model: onnx.ModelProto, planned: InputShapes, given: dict[str, list[int]] | None,
                         seed: int = 0) -> InputShapes | None:
    """After something failed at `planned` sizes (unchecked): None if the dense model runs there (the
    failure is not the sizes'), else the sizes it runs at. Raises UnsupportedModelError, naming
    --input-shape, when it runs at none tried."""
    found = probe_dense(model, given, seed)
    return None if found.shapes == planned.shapes else found


def _quiet_runner(session: ort.InferenceSession) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a size the model cannot run is an expected answer, not an error to print
    return lambda feeds: session.run(None, feeds, quiet)
