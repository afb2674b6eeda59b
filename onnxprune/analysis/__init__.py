"""Dependency analysis: which channels, neurons and heads can go, and what goes with them."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from onnxprune.analysis.context import AnalysisState, ParamSlice, SinkUse, Source
from onnxprune.analysis.groups import Group, build_groups
from onnxprune.analysis.rules import rule_for
from onnxprune.analysis.shared import block_divergent_readers, watch_shared_constants
from onnxprune.analysis.units import NO_UNIT
from onnxprune.ir.graph_view import GraphView

log = logging.getLogger(__name__)

__all__ = ["Analysis", "Group", "ParamSlice", "SinkUse", "Source", "analyze_graph"]


@dataclass
class Analysis:
    view: GraphView
    state: AnalysisState
    groups: list[Group]
    root_of: np.ndarray

    @property
    def layouts(self) -> dict[str, dict[int, np.ndarray]]:
        return self.state.layouts

    def group(self, name_or_id: str | int) -> Group:
        for g in self.groups:
            if g.id == name_or_id or g.name == name_or_id:
                return g
        raise KeyError(name_or_id)

    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def keep_masks(self, removed_roots: set[int] | np.ndarray) -> dict[tuple[str, int], np.ndarray]:
        """(tensor, axis) -> boolean keep mask, for every axis that loses positions."""
        removed = np.zeros(len(self.root_of) + 1, dtype=bool)
        removed[np.fromiter(removed_roots, dtype=np.int64)] = True
        masks = {}
        for tensor, axes in self.state.layouts.items():
            for axis, layout in axes.items():
                roots = np.where(layout == NO_UNIT, len(self.root_of), self.root_of[np.maximum(layout, 0)])
                keep = ~removed[roots]
                if not keep.all():
                    masks[(tensor, axis)] = keep
        return masks


def _block_folded_inputs(node, state: AnalysisState) -> None:
    """Units on a dynamic axis (a folded (batch*heads) axis) reach only rules that know the fold."""
    for name in node.input:
        shape = state.view.shape(name) if name else None
        for axis, layout in state.layouts_of(name).items() if name else ():
            if shape is not None and not isinstance(shape[axis], int):
                state.block(layout, f"{node.op_type} '{node.name}' reads units folded into the dynamic axis "
                                    f"{axis} of '{name}' ({shape[axis]}); only Reshape and Transpose follow them")


def analyze_graph(view: GraphView, hidden_width: bool = False, prune_cache: bool = False) -> Analysis:
    """Walk the graph once in topological order, applying each node's rule.

    hidden_width: let units through LayerNorm, RMSNorm and other statistics over
    their axis (and open them at embedding lookups), so that the residual
    stream's width becomes a prunable group; not lossless (the statistics change).
    prune_cache: let heads and KV groups reach a decoder's key-value cache inputs and
    outputs (rules/concat.py); `state.cache_inputs` / `cache_outputs` name them, and the
    pruned model reads and writes fewer heads there.
    """
    state = AnalysisState(view, hidden_width=hidden_width, prune_cache=prune_cache)
    watch_shared_constants(state)
    for node in view.nodes:
        rule = rule_for(node)
        if not rule.reads_folded_axes:
            _block_folded_inputs(node, state)
        state.reader = node.name  # which axes of shared weights this rule takes up
        try:
            rule.propagate(node, state)
        except Exception as exc:  # a rule bug must not take down the other groups
            log.debug("rule for %s failed", node.name, exc_info=True)
            for name in list(node.input) + list(node.output):
                if name:
                    state.block_tensor(name, f"{node.op_type} '{node.name}': rule failed ({exc})")
        state.reader = None
    block_divergent_readers(state)
    for name in view.graph_outputs:
        if name not in state.cache_outputs:
            state.block_tensor(name, f"reaches graph output '{name}'")
    groups, root_of = build_groups(state)
    return Analysis(view, state, groups, root_of)
