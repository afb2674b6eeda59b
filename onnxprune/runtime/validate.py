"""Checks a rewritten model must pass before anything is written.

onnx.checker, strict shape inference, and an onnxruntime run on random inputs
of the right shapes and dtypes; in lossless mode the outputs must also equal
the dense model's.  Failures raise ValidationError naming what broke.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx

from onnxprune.errors import ValidationError
from onnxprune.ir.model_io import EXTERNAL_DATA_THRESHOLD, copy_fields, has_external_data, model_byte_size, \
    tensor_bytes
from onnxprune.ir.shapes import skeleton
from onnxprune.runtime.inputs import random_inputs
from onnxprune.runtime.session import make_session


@dataclass
class ValidationResult:
    checks: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    output_shapes: dict[str, list[int]] = field(default_factory=dict)
    serialized: bytes | None = None  # the validated bytes, reused for saving (models < 2 GB)
    feeds: dict[str, np.ndarray] = field(default_factory=dict)  # the run's inputs and outputs: the saved
    outputs: list[np.ndarray] = field(default_factory=list)     # file must reproduce them from disk


def runtime_only_ops(model: onnx.ModelProto) -> list[str]:
    """Ops in the default domain that onnx does not define but onnxruntime does
    (SimplifiedLayerNormalization, written by onnxruntime's transformer optimizer):
    onnx.checker rejects them, onnxruntime runs them."""
    unknown = sorted({n.op_type for n in model.graph.node
                      if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)})
    if not unknown:
        return []
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema

    known = {s.name for s in get_all_operator_schema() if s.domain in ("", "ai.onnx")}
    return [op for op in unknown if op in known]


# Weights over this many bytes reach onnx.checker as one-element stand-ins (see checker_copy).
CHECKER_STUB_BYTES = 1 << 16


def checker_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` for onnx.checker, its large raw-data weights replaced by one-element tensors of their type
    and rank: the checker parses every byte it is given (a third of a second on BERT-base) to check
    nodes, names, types, order and opsets, none of which a weight's values change. Their sizes against
    their dims are what it would miss; the onnxruntime run of the real model checks those."""
    copy = onnx.ModelProto()
    copy_fields(model, copy, skip="graph")
    copy_fields(model.graph, copy.graph, skip="initializer")
    for t in model.graph.initializer:
        if not t.HasField("raw_data") or tensor_bytes(t) <= CHECKER_STUB_BYTES:
            copy.graph.initializer.append(t)
            continue
        stub = copy.graph.initializer.add()
        stub.name, stub.data_type = t.name, t.data_type
        stub.dims.extend([1] * len(t.dims))
        stub.raw_data = b"\0" * max(1, onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize)
    return copy


def run_model(model: onnx.ModelProto | bytes, feeds: dict[str, np.ndarray], what: str = "model",
              serialized: bytes | None = None) -> list[np.ndarray]:
    try:
        # every core: a large model's validation pass is much of prune's time; the read-back check
        # of a file with external data runs through here too, with the same settings, so its
        # comparison stays exact
        session = make_session(model, prepack=False, optimize=False, threads=0, serialized=serialized)
        return session.run(None, feeds)
    except Exception as exc:
        raise ValidationError(f"onnxruntime could not run the {what}: {exc}") from exc


def validate_model(model: onnx.ModelProto, input_shapes: dict[str, list[int]], *,
                   reference_outputs: list[np.ndarray] | None = None, expected_shapes: list[tuple] | None = None,  # None: a dim not to compare
                   atol: float = 1e-5, rtol: float = 1e-4, seed: int = 0,
                   run_from: str | os.PathLike | None = None,
                   feeds: dict[str, np.ndarray] | None = None) -> ValidationResult:
    """`run_from`: the model's file, already written (a model with weights on disk is run from there).
    `feeds`: what to run it on (default: random inputs at `input_shapes`, from `seed`)."""
    result = ValidationResult()
    runtime_only = runtime_only_ops(model)
    if model_byte_size(model) < EXTERNAL_DATA_THRESHOLD and not has_external_data(model):
        # serialise once: onnxruntime and the final write share these bytes
        result.serialized = model.SerializeToString()
    if result.serialized is not None and not runtime_only:
        try:
            onnx.checker.check_model(checker_copy(model).SerializeToString())
        except Exception as exc:
            raise ValidationError(f"onnx.checker rejected the pruned model: {exc}") from exc
        result.checks.append("onnx.checker")
    try:
        # onnx cannot infer through onnxruntime's own ops: strict only where it knows every op
        onnx.shape_inference.infer_shapes(skeleton(model, input_shapes), strict_mode=not runtime_only,
                                          data_prop=True)
    except Exception as exc:
        raise ValidationError(f"shape inference failed on the pruned model: {exc}") from exc
    result.checks.append("shape inference" if not runtime_only else
                         f"shape inference (lenient: onnxruntime-only ops {', '.join(runtime_only)})")
    if feeds is None:
        feeds = random_inputs(model, input_shapes, seed)
    if run_from is not None:
        outputs = run_model(str(run_from), feeds, f"pruned model as written to disk ({run_from}; nothing was "
                                                  "moved into place)")
    else:
        # the ModelProto, its weights read in place from the serialised bytes (make_session): no parse
        # of every weight; what is written, `serialized`, is compared byte for byte when read back
        outputs = run_model(model, feeds, "pruned model", serialized=result.serialized)
    result.feeds, result.outputs = feeds, outputs
    result.checks.append("onnxruntime run" if run_from is None else "onnxruntime run of the written file")
    names = [o.name for o in model.graph.output]
    result.output_shapes = {n: list(o.shape) for n, o in zip(names, outputs)}
    if expected_shapes is not None:
        for name, out, want in zip(names, outputs, expected_shapes):
            if len(out.shape) != len(want) or any(w is not None and w != d for d, w in zip(out.shape, want)):
                raise ValidationError(f"output '{name}' changed shape: {tuple(want)} -> {tuple(out.shape)}")
        result.checks.append("output shapes unchanged")
    if reference_outputs is not None:
        worst = 0.0
        for name, out, ref in zip(names, outputs, reference_outputs):
            diff = float(np.max(np.abs(out.astype(np.float64) - ref.astype(np.float64)))) if out.size else 0.0
            worst = max(worst, diff)
            if not np.allclose(out, ref, atol=atol, rtol=rtol):
                raise ValidationError(
                    f"output '{name}' differs from the dense model by up to {diff:.3g}; "
                    "lossless elimination must not change outputs (please report this model)"
                )
        result.max_abs_diff = worst
        result.checks.append("outputs equal the dense model")
    return result
