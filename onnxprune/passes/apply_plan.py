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
from onnx import numpy_helper

from onnxprune.analysis import Analysis
from onnxprune.analysis.rules import rule_for
from onnxprune.errors import PlanError
from onnxprune.ir.model_io import EXTERNAL_MIN_BYTES, Spill, copy_fields, is_external
from onnxprune.analysis.rewriter import Rewriter


def apply_removal(model: onnx.ModelProto, analysis: Analysis, removed_roots: set[int]) -> onnx.ModelProto:
    """The pruned copy of `model` (the one `analysis` was built on); `model` is not changed.

    A new ModelProto is built rather than editing in place: protobuf keeps
    replaced tensor bytes in the old message's arena, so in-place slicing would
    hold dense and pruned weights in memory together until the end.
    """
    if not removed_roots:
        return model
    masks = analysis.keep_masks(removed_roots)
    for (tensor, axis), mask in masks.items():
        if not mask.any():
            raise PlanError(
                f"the plan removes every position of axis {axis} of '{tensor}'; keep at least one unit "
                "in each group (and each Split/Concat piece)"
            )
    pruned = onnx.ModelProto()
    copy_fields(model, pruned, skip="graph")
    copy_fields(model.graph, pruned.graph, skip="initializer")
    del pruned.graph.value_info[:]
    _slice_initializers(model, pruned, analysis, masks)
    rw = Rewriter(pruned, analysis.view, masks)
    for node in pruned.graph.node:
        rule_for(node).rewrite(node, rw)
    rw.finish()
    return pruned


def _slice_initializers(model, pruned, analysis, masks) -> None:
    by_tensor: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (tensor, axis), mask in masks.items():
        if analysis.view.is_const(tensor):
            by_tensor.setdefault(tensor, []).append((axis, mask))
    spill = None
    for t in model.graph.initializer:
        cuts = by_tensor.get(t.name)
        if not cuts:
            pruned.graph.initializer.append(t)
            continue
        arr = analysis.view.const(t.name)
        index = [np.arange(n) for n in arr.shape]
        for axis, mask in cuts:
            index[axis] = np.flatnonzero(mask)
        arr = arr[np.ix_(*index)]
        if is_external(t) and arr.nbytes >= EXTERNAL_MIN_BYTES:  # read from disk, written back to disk
            spill = spill or Spill()
            pruned.graph.initializer.append(spill.add(arr, t.name))
        else:
            pruned.graph.initializer.append(numpy_helper.from_array(arr, t.name))
        del arr
