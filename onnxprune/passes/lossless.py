"""Lossless elimination: remove only structure that is exactly dead.

* Units whose every position, wherever another layer consumes it, is exactly
  zero for any input (zero filters and biases, or zero BN gamma and beta,
  carried through zero-preserving ops).  Removing them cannot change outputs.
* Residual branches whose whole output is exactly zero: the Add becomes a
  pass-through of the other input and the branch is deleted.
What structured-sparse training exported as zeros is physically removed.
"""
from __future__ import annotations

import onnx

from onnxprune.analysis import Analysis
from onnxprune.analysis.zeros import ZeroState
from onnxprune.passes.depth import reroute

RESIDUAL_OPS = {"Add", "Sum"}


def dead_units(analysis: Analysis, zeros: ZeroState) -> set[int]:
    """Roots that are zero at every consuming (mixing) op; one unit per group survives."""
    eligible = {int(r): g for g in analysis.prunable_groups() if not g.inexact for r in g.roots.tolist()}
    alive: set[int] = set()
    consumed: set[int] = set()
    for use in analysis.state.sinks:
        zero = zeros.zero_set(use.tensor)
        for r in zeros.positions(use.tensor):
            consumed.add(r)
            if r not in zero:
                alive.add(r)
    dead = {r for r in consumed - alive if r in eligible}
    for g in {id(g): g for g in eligible.values()}.values():
        roots = [int(r) for r in g.roots.tolist()]
        if roots and all(r in dead for r in roots):
            dead.discard(roots[0])  # an empty layer is not a valid graph; keep one unit
    return dead


def zero_branches(analysis: Analysis, zeros: ZeroState) -> list[tuple[onnx.NodeProto, str]]:
    """(residual node, surviving input) for every Add/Sum with an all-zero input."""
    view = analysis.view
    found = []
    for node in view.nodes:
        inputs = [i for i in node.input if i]
        if node.op_type not in RESIDUAL_OPS or len(inputs) != 2:
            continue
        for dead, other in ((inputs[0], inputs[1]), (inputs[1], inputs[0])):
            if view.is_const(dead) or not zeros.entirely_zero(dead):
                continue
            if view.shape(other) != view.shape(node.output[0]) or None in (view.shape(other) or (None,)):
                continue  # the survivor must already have the output's shape
            found.append((node, other))
            break
    return found


def bypass(model: onnx.ModelProto, residuals: list[tuple[onnx.NodeProto, str]]) -> None:
    """Route each residual's readers to its surviving input; the branch becomes dead code.

    A residual that is itself a graph output keeps its name (an Identity of the survivor).
    """
    reroute(model, {node.output[0]: other for node, other in residuals})
