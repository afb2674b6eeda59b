"""Lossless elimination: remove only structure that is exactly dead.

* Residual branches whose whole output is exactly zero: the Add becomes a
  pass-through of the other input and the branch is deleted
  (`BypassZeroBranches`, repeated to a fixed point: a bypass can leave
  another branch all zero).
* Then units that no consuming layer can tell from zero: wherever another
  layer consumes them, every position is exactly zero for any input (zero
  filters and biases, or zero BN gamma and beta, carried through
  zero-preserving ops), or the float weight slice that reads them there is
  exactly zero (a query head whose o_proj rows are zero). `dead_units` names
  them and `ApplyPlan` removes them. Removing them cannot change outputs.
What structured-sparse training exported as zeros is physically removed.

    found = find_dead_structure(model)
    ApplyPlan(found.analysis, found.dead_units)(found.model)
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxprune.analysis import Analysis, analyze_graph
from onnxprune.analysis.units import NO_UNIT
from onnxprune.analysis.zeros import ZeroState
from onnxprune.ir.editor import GraphEditor, copy_model
from onnxprune.ir.graph_view import GraphView
from onnxprune.ir.shapes import infer_shapes, skeleton
from onnxprune.passes.cleanup import remove_dead_code
from onnxprune.passes.protocol import FixedPoint, Pass, PassRecord, PassResult

RESIDUAL_OPS = {"Add", "Sum"}


def dead_units(analysis: Analysis, zeros: ZeroState) -> set[int]:
    """Roots that every consuming (mixing) op sees as zero or never reads; one unit per group survives."""
    eligible = {int(r): g for g in analysis.prunable_groups() if not g.inexact for r in g.roots.tolist()}
    unread = unread_units(analysis)
    alive: set[int] = set()
    consumed: set[int] = set()
    for use in analysis.state.sinks:
        zero = zeros.zero_set(use.tensor) | unread.get(use.node, set())
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


def unread_units(analysis: Analysis) -> dict[str, set[int]]:
    """Node -> the roots its float weight does not read: the weight's slice along their input axis
    (role weight_in) is exactly zero, so whatever values they carry there, the node computes the same
    without them. Integer (quantized) weights are left out: their zero is the zero point's."""
    view, root_of = analysis.view, analysis.root_of
    out: dict[str, set[int]] = {}
    for p in analysis.state.params:
        if p.role != "weight_in":
            continue
        values = view.const(p.tensor)
        layout = analysis.layouts.get(p.tensor, {}).get(p.axis)
        if values is None or layout is None or values.dtype.kind != "f" or values.shape[p.axis] != len(layout):
            continue
        read = np.moveaxis(values != 0, p.axis, 0).reshape(len(layout), -1).any(axis=1)
        roots = np.where(layout == NO_UNIT, -1, root_of[np.maximum(layout, 0)])
        unread = set(roots[roots >= 0].tolist()) - set(roots[read].tolist())
        if unread:
            out.setdefault(p.node, set()).update(unread)
    return out


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


@dataclass
class ZeroFacts:
    """The analysis of one model and where its tensors are exactly zero."""

    model: onnx.ModelProto
    analysis: Analysis
    zeros: ZeroState

    @classmethod
    def of(cls, model: onnx.ModelProto, prune_cache: bool = False) -> ZeroFacts:
        # shapes inferred on a weight-free skeleton: inference on the model itself would write its value_info
        analysis = analyze_graph(GraphView(model, infer_shapes(skeleton(model))), prune_cache=prune_cache)
        return cls(model, analysis, ZeroState(analysis).run())


class BypassZeroBranches(Pass):
    """Route the readers of each residual Add/Sum with an all-zero input to its other input; the
    branch becomes dead code and is removed. A residual that is itself a graph output keeps its
    name (an Identity of the survivor). One round: what a bypass makes zero is found by the next.

    `facts` keeps the analysis of the last model looked at: when a round finds nothing, that
    model is the result, and its analysis is what dead units are searched in (with `prune_cache`,
    one that lets heads go from a key-value cache)."""

    name = "bypass_zero_branches"

    def __init__(self, prune_cache: bool = False):
        self.facts: ZeroFacts | None = None
        self.prune_cache = prune_cache

    def run(self, model: onnx.ModelProto) -> PassResult:
        self.facts = facts = ZeroFacts.of(model, self.prune_cache)
        residuals = zero_branches(facts.analysis, facts.zeros)
        if not residuals:
            return self.unchanged(model, "no all-zero residual branch")
        out = copy_model(model)
        edit = GraphEditor(out)
        edit.reroute({node.output[0]: other for node, other in residuals})
        dead = remove_dead_code(edit)
        names = [node.name for node, _ in residuals]
        return self.changed(out, f"bypassed {len(names)} all-zero residual branch(es)", residuals=names,
                            nodes=dead.dead_nodes)


@dataclass
class DeadStructure:
    """What lossless elimination found: the model with every all-zero residual branch bypassed,
    its analysis, and the dead units left to remove from it (`ApplyPlan`)."""

    model: onnx.ModelProto
    analysis: Analysis
    dead_units: set[int]
    branches: int          # residual branches bypassed
    record: PassRecord     # the bypass rounds


def find_dead_structure(model: onnx.ModelProto, prune_cache: bool = False) -> DeadStructure:
    """Bypass all-zero residual branches until none is left, then find the dead units (with `prune_cache`,
    heads and KV groups that reach a key-value cache too). `model` is not changed."""
    bypass = BypassZeroBranches(prune_cache)
    # every round that changes the model removes a residual node: the bound is never reached
    result = FixedPoint(bypass, max_rounds=len(model.graph.node) + 1)(model)
    facts = bypass.facts if bypass.facts is not None and bypass.facts.model is result.model \
        else ZeroFacts.of(result.model, prune_cache)
    branches = sum(len(r.details.get("residuals", ())) for r in result.record.children)
    return DeadStructure(result.model, facts.analysis, dead_units(facts.analysis, facts.zeros), branches,
                         result.record)
