"""Concrete input shapes and random inputs for runs of a model.

Dynamic dimensions get a documented default unless the user fixes them with
--input-shape: the first axis (batch) is 1, any other dynamic axis is 16.
Dimensions that share a symbolic name get the same value.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxprune.errors import OnnxPruneError

DEFAULT_BATCH = 1
DEFAULT_DYNAMIC_DIM = 16


def parse_input_shapes(spec: str | None) -> dict[str, list[int]]:
    """'input:1x3x224x224,mask:1x128' -> {'input': [1, 3, 224, 224], 'mask': [1, 128]}."""
    if not spec:
        return {}
    out = {}
    for part in spec.split(","):
        name, sep, dims = part.strip().rpartition(":")
        if not sep or not name:
            raise OnnxPruneError(f"--input-shape '{part}': expected NAME:D1xD2x..., e.g. input:1x3x224x224")
        try:
            out[name] = [int(d) for d in dims.lower().split("x")]
        except ValueError as exc:
            raise OnnxPruneError(f"--input-shape '{part}': dimensions must be integers") from exc
    return out


def concrete_input_shapes(model: onnx.ModelProto, given: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    given = given or {}
    names = [i.name for i in model.graph.input]
    unknown = set(given) - set(names)
    if unknown:
        raise OnnxPruneError(f"--input-shape names {sorted(unknown)}, but the model's inputs are {names}")
    symbols: dict[str, int] = {}
    shapes = {}
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if vi.name in given:
            if len(given[vi.name]) != len(dims):
                raise OnnxPruneError(
                    f"--input-shape for '{vi.name}' has {len(given[vi.name])} dims, the model input has {len(dims)}"
                )
            shape = list(given[vi.name])
            for d, v in zip(dims, shape):
                if d.HasField("dim_param"):
                    symbols.setdefault(d.dim_param, v)
            shapes[vi.name] = shape
            continue
        shape = []
        for axis, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                shape.append(d.dim_value)
            else:
                default = DEFAULT_BATCH if axis == 0 else DEFAULT_DYNAMIC_DIM
                key = d.dim_param if d.HasField("dim_param") else None
                value = symbols.setdefault(key, default) if key else default
                shape.append(value)
        shapes[vi.name] = shape
    return shapes


def random_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for vi in model.graph.input:
        dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
        shape = shapes[vi.name]
        if dtype.kind == "f":
            feeds[vi.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu":
            feeds[vi.name] = rng.integers(0, 2, shape).astype(dtype)  # valid as token ids and masks
        elif dtype.kind == "b":
            feeds[vi.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            raise OnnxPruneError(f"input '{vi.name}' has type {dtype}, which random validation cannot generate")
    return feeds
