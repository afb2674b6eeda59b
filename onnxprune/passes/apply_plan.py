"""Physically remove units: slice every coupled initializer, patch attributes.

`ApplyPlan` is the pass every pruning mode ends in (magnitude, lossless, replayed
plans): given the roots to remove, it computes each affected axis's keep mask
from the analysis layouts, slices initializers along them, and lets each
node's rule rewrite what depends on sizes (group counts, Reshape targets,
Split sizes, Slice bounds, Resize sizes, Expand shapes).
"""
from __future__ import annotations

import numpy as np
import onnx

from onnxprune.analysis import Analysis
from onnxprune.analysis.rewriter import Rewriter
from onnxprune.analysis.rules import rule_for
from onnxprune.errors import PlanError
from onnxprune.ir.model_io import EXTERNAL_MIN_BYTES, Spill, add_tensor, copy_fields, is_external
from onnxprune.passes.protocol import Pass, PassResult


class ApplyPlan(Pass):
    """Remove the units `removed_roots` names from the model `analysis` was built on (or an equal one).

    The pruned model is a new ModelProto rather than the input edited in place:
    protobuf keeps replaced tensor bytes in the old message's arena, so in-place
    slicing would hold dense and pruned weights in memory together until the end.
    """

    name = "apply_plan"

    def __init__(self, analysis: Analysis, removed_roots: set[int]):
        self.analysis = analysis
        self.removed_roots = removed_roots

    def run(self, model: onnx.ModelProto) -> PassResult:
        if not self.removed_roots:
            return self.unchanged(model, "no unit to remove")
        masks = self.analysis.keep_masks(self.removed_roots)
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
        sliced = _slice_initializers(model, pruned, self.analysis, masks)
        rw = Rewriter(pruned, self.analysis.view, masks)
        for node in pruned.graph.node:
            rule_for(node).rewrite(node, rw)
        rw.finish()
        declared = _declare_kept_dims(pruned, masks)
        units = len(self.removed_roots)
        summary = f"removed {units} unit(s); {sliced} initializer(s) sliced"
        if declared:  # a key-value cache that lost heads: the model's interface changed
            summary += f"; {len(declared)} graph input(s)/output(s) now declare fewer heads"
            return self.changed(pruned, summary, units=units, axes=len(masks), initializers_sliced=sliced,
                                interface=declared)
        return self.changed(pruned, summary, units=units, axes=len(masks), initializers_sliced=sliced)


def _declare_kept_dims(pruned: onnx.ModelProto, masks) -> dict[str, list]:
    """Graph inputs and outputs that lose positions declare the kept count on that axis. Only a
    key-value cache does (`prune_cache`): other graph inputs carry no units and the analysis blocks
    units that reach other graph outputs. Returns name -> its declared dims now."""
    declared = {}
    for vi in list(pruned.graph.input) + list(pruned.graph.output):
        dims = vi.type.tensor_type.shape.dim
        for axis in range(len(dims)):
            keep = masks.get((vi.name, axis))
            if keep is not None:
                dims[axis].Clear()
                dims[axis].dim_value = int(keep.sum())
        if any((vi.name, axis) in masks for axis in range(len(dims))):
            declared[vi.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
    return declared


def _slice_initializers(model, pruned, analysis, masks) -> int:
    by_tensor: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (tensor, axis), mask in masks.items():
        if analysis.view.is_const(tensor):
            by_tensor.setdefault(tensor, []).append((axis, mask))
    spill = None
    sliced = 0
    for t in model.graph.initializer:
        cuts = by_tensor.get(t.name)
        if not cuts:
            pruned.graph.initializer.append(t)
            continue
        arr = analysis.view.const(t.name)
        for axis, mask in cuts:  # one axis at a time: np.take is many times quicker than an open-mesh index
            arr = np.take(arr, np.flatnonzero(mask), axis=axis)
        if is_external(t) and arr.nbytes >= EXTERNAL_MIN_BYTES:  # read from disk, written back to disk
            spill = spill or Spill()
            pruned.graph.initializer.append(spill.add(arr, t.name))
        else:
            add_tensor(pruned.graph.initializer, arr, t.name)
        del arr
        sliced += 1
    return sliced
