"""Physically remove units: slice every coupled initializer, patch attributes.

This is the pass every pruning mode ends in (magnitude, lossless, replayed
plans): given the roots to remove, it computes each affected axis's keep mask
from the analysis layouts, slices initializers along them, and lets each
node's rule rewrite what depends on sizes (group counts, Reshape targets,
Split sizes, Slice bounds, Resize sizes, Expand shapes).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from onnxprune.analysis import Analysis
from onnxprune.analysis.rules import rule_for
from onnxprune.errors import PlanError
from onnxprune.passes.rewriter import Rewriter


def apply_removal(model: onnx.ModelProto, analysis: Analysis, removed_roots: set[int]) -> int:
    """Rewrite `model` (the one `analysis` was built on) in place.

    Returns the number of initializers sliced.
    """
    if not removed_roots:
        return 0
    masks = analysis.keep_masks(removed_roots)
    for (tensor, axis), mask in masks.items():
        if not mask.any():
            raise PlanError(
                f"the plan removes every position of axis {axis} of '{tensor}'; keep at least one unit "
                "in each group (and each Split/Concat piece)"
            )
    sliced = _slice_initializers(model, analysis, masks)
    rw = Rewriter(model, analysis.view, masks)
    for node in model.graph.node:
        rule_for(node).rewrite(node, rw)
    del model.graph.value_info[:]
    return sliced


def _slice_initializers(model, analysis, masks) -> int:
    by_tensor: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (tensor, axis), mask in masks.items():
        if analysis.view.is_const(tensor):
            by_tensor.setdefault(tensor, []).append((axis, mask))
    for t in model.graph.initializer:
        cuts = by_tensor.get(t.name)
        if not cuts:
            continue
        arr = analysis.view.const(t.name)
        index = [slice(None)] * arr.ndim
        for axis, mask in cuts:
            index[axis] = np.flatnonzero(mask)
        arr = arr[np.ix_(*[np.arange(n) if isinstance(i, slice) else i for n, i in zip(arr.shape, index)])]
        _store(t, arr)
    return len(by_tensor)


def _store(t: onnx.TensorProto, arr: np.ndarray) -> None:
    """Overwrite an initializer's contents in place (one copy, no re-encoding)."""
    for field in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        t.ClearField(field)
    t.ClearField("external_data")
    t.data_location = onnx.TensorProto.DEFAULT
    t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
    del t.dims[:]
    t.dims.extend(arr.shape)
    t.raw_data = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
